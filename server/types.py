"""The plain data that crosses the layers: sampling settings, a chat request, the events of an answer.

Nothing here imports torch: the API layer depends on this module only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "tool_calls", "function_call", "abort"]


@dataclass
class SamplingParams:
    """Per-request sampling settings; every request in a batch keeps its own."""

    max_tokens: int | None = None  # None: up to the context
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit before sampling
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely (the raw distribution)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class ChatRequest:
    """One choice of a chat completion, already validated by the API layer.

    `messages` and `tools` use the OpenAI wire layout as plain dicts (content flattened to text),
    so a model family can render them without knowing about pydantic.
    """

    messages: list[dict[str, Any]]
    sampling: SamplingParams
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | {"type": "function", ...}
    legacy_functions: bool = False  # request used `functions`: answer with `function_call`
    adapter: str | None = None  # LoRA adapter name, None for the base model
    request_id: str = ""
    # Structured outputs: None (free text), {"type": "json_object"} or {"type": "json_schema", "schema": {...},
    # "strict": bool, "where": the schema's path in the request, for errors}
    response_format: dict[str, Any] | None = None


@dataclass
class CompletionRequest:
    """One choice of a legacy completion (POST /v1/completions): a raw prompt's ids, no chat template."""

    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: str | None = None
    request_id: str = ""


@dataclass
class TokenLogprob:
    """One generated token with its log probability and the most likely tokens at its step (highest first).

    `token` is the token's own text; `bytes` its UTF-8 bytes, which are part of a character where one takes several
    tokens (`token` then shows them as \\x escapes). Values are the model's raw distribution (before temperature,
    penalties, logit_bias and top-p), as vLLM reports them by default.
    """

    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]] = field(default_factory=list)
    offset: int = 0  # where the token starts in the generated text, in characters


@dataclass
class TextDelta:
    text: str
    logprobs: list[TokenLogprob] | None = None  # the tokens released with this text (when logprobs were asked)


@dataclass
class ToolCallDelta:
    """A piece of one tool call: the first delta of a call carries id and name, later ones argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


ChatEvent = TextDelta | ToolCallDelta | Finished


@dataclass
class ModelCard:
    id: str
    owned_by: str = "glm-serve"
    kind: Literal["chat", "embedding"] = "chat"
    root: str | None = None  # the underlying model for an alias or a LoRA adapter
    context_length: int | None = None
