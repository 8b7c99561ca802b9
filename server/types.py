"""The plain data that crosses the layers: sampling settings, a chat request, the events of an answer.

Nothing here imports torch: the API layer depends on this module only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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


@dataclass
class TextDelta:
    text: str


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


class ChatEngine(Protocol):
    """What the API layer needs from a chat model. Many `chat` calls may run at once."""

    def models(self) -> list[ModelCard]: ...

    def resolve(self, model: str) -> str | None:
        """The adapter name (or "" for the base model) a requested model id maps to, None if unknown."""

    def prepare(self, request: ChatRequest) -> PreparedChat:
        """Render and count the prompt; raise PromptTooLong / EngineError before anything streams."""

    def prepare_choices(self, requests: list[ChatRequest]) -> list[PreparedChat]:
        """`prepare` for the n choices of one request, which differ only in sampling: the prompt is rendered once.
        Blocking (tokenizing a long prompt takes a while): call it in a worker thread."""

    def chat(self, prepared: PreparedChat) -> AsyncIterator[ChatEvent]:
        """Events for one choice, ending with exactly one Finished. Closing the iterator cancels the request."""


class PreparedChat(Protocol):
    prompt_tokens: int


class Embedder(Protocol):
    model_id: str
    dimensions: int

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Normalized vectors and the prompt token count (the embedding model's own tokenizer)."""
