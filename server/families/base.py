"""What a model family contributes: prompt in, text and tool calls out.

A family knows its tokenizer, how to turn OpenAI-style messages into token ids and how to read the
model's text back into content and tool calls. It knows nothing about HTTP or about batching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from server.types import ChatEvent, ChatRequest, FinishReason


class OutputParser(Protocol):
    """Turns the model's text (fed as it streams, stop strings already removed) into events."""

    def feed(self, text: str) -> list[ChatEvent]: ...

    def finish(self, reason: FinishReason) -> tuple[list[ChatEvent], FinishReason]:
        """Flush what is held back; may change the finish reason (e.g. "stop" -> "tool_calls")."""


class PlainTextParser:
    """The parser for models without tool-call syntax: text passes straight through."""

    def feed(self, text: str) -> list[ChatEvent]:
        from server.types import TextDelta

        return [TextDelta(text)] if text else []

    def finish(self, reason: FinishReason) -> tuple[list[ChatEvent], FinishReason]:
        return [], reason


@dataclass
class Prompt:
    token_ids: list[int]
    parser: OutputParser
    # Extra token ids that end generation for this request (besides the family's eos ids).
    stop_token_ids: set[int] = field(default_factory=set)
    # The answer must begin with one of these id sequences (e.g. the metadata line of one of the tools, for
    # tool_choice "required"); empty: no constraint.
    forced_prefixes: list[list[int]] = field(default_factory=list)
    # The whole answer must match this grammar (EBNF text from server/structured: a response_format or a forced
    # tool call); None: free.
    grammar: str | None = None


class TokenizerLike(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class ModelFamily(Protocol):
    name: str
    tokenizer: TokenizerLike
    eos_token_ids: set[int]

    def build_prompt(self, request: ChatRequest) -> Prompt:
        """Render messages (+ tools, tool_choice) to token ids; raise EngineError for what cannot be expressed."""

    def decode(self, token_ids: list[int]) -> str:
        """Text of generated ids, as the user should see it (used by the incremental detokenizer)."""

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes, for logprobs (part of a character for byte-fallback pieces; specials by name)."""

    def encode_raw(self, text: str) -> list[int]:
        """A raw prompt's ids (POST /v1/completions: no chat template), as the tokenizer's own encode() does it."""


def flatten_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The `function` objects of OpenAI `tools` entries."""
    return [t.get("function", t) for t in tools or []]
