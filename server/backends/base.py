"""The token-level seam every engine backend implements: prompt ids in, generated ids out.

Everything above it (model ids, prompt rendering, the context check, detokenizing, stop strings, tool calls,
usage, n choices) lives once in server/serving; a backend only decodes. Backends: native (our scheduler over
transformers, server/backends/native) and vllm (a vLLM server in --tokens-only mode, server/backends/vllm).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from server.types import SamplingParams

BackendFinish = Literal["stop", "length", "abort"]


@dataclass
class GenerateRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams  # stop *strings* are cut above the seam; the backend reads the rest
    max_tokens: int  # already resolved against the context: the backend never generates more
    stop_token_ids: set[int] = field(default_factory=set)  # generation ends after one of these (it is counted)
    adapter: str | None = None  # served model id of a LoRA adapter (a key of adapter_names()), None: the base
    # The answer must begin with one of these id sequences (a forced tool call's metadata line); empty: free.
    forced_prefixes: list[list[int]] = field(default_factory=list)
    # The whole answer must match this grammar (EBNF from server/structured, already checked); None: free.
    grammar: str | None = None


@dataclass
class StepLogprobs:
    """The raw logprob of one generated id and the `sampling.logprobs` most likely ids at its step, highest first."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TokenChunk:
    """New ids of one sequence since its last chunk; the last chunk of a sequence has a finish reason.

    A stop token that ended the sequence is the last id of its chunk. "abort": cancelled or cut short by the
    backend itself; a failure is raised (EngineFailure / EngineUnavailable), never a chunk.
    """

    token_ids: list[int]
    finish_reason: BackendFinish | None = None
    logprobs: list[StepLogprobs] | None = None  # one per id of token_ids when the request asked for logprobs


@dataclass
class Capacity:
    running: int
    waiting: int
    max_running: int
    max_waiting: int
    kv_cache_bytes: int | None = None  # where the backend knows it


class TokenStream(Protocol):
    """The chunks of one submitted sequence. Ends after the chunk with a finish reason."""

    def __aiter__(self) -> AsyncIterator[TokenChunk]: ...

    def cancel(self) -> None:
        """Abort now, without awaiting: safe inside an already-cancelled task's cleanup."""

    async def aclose(self) -> None:
        """Abort if still running and wait until the backend has let go of the sequence."""


class Backend(Protocol):
    name: str  # "native" | "vllm"
    context_length: int  # the longest prompt + completion one sequence may have

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerateRequest) -> TokenStream:
        """Queue the sequence now, so a full server is an EngineOverloaded (429) before any byte streams."""

    def prepare_grammar(self, grammar: str) -> None:
        """Get a grammar ready before the request is queued (blocking: called in the request's worker thread);
        raise EngineError if this engine cannot use it."""

    def adapter_names(self) -> dict[str, str]:
        """Served model id -> the backend's own name for each LoRA adapter it has loaded."""

    def capacity(self) -> Capacity: ...

    def health(self) -> str | None:
        """None while serving; otherwise why not (restarting after a crash, gone), for /health and a 503."""

    def describe(self) -> list[str]:
        """Lines for the one-screen startup summary: engine, device, dtype, weights, batching."""
