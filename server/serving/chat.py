"""ChatService: the one road every chat request takes above the engine backend, whichever backend it is.

Model ids in, a family's prompt ids out to the backend (with the context check and any forced prefix), and the
backend's token ids back in as text: UTF-8-safe detokenizing, stop strings, the family's tool-call parser,
exact usage and timing. The n choices of a request share one rendered prompt.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from server.backends.base import Backend, GenerateRequest, TokenStream
from server.errors import EngineError, PromptTooLong, RequestTimeout
from server.families.base import ModelFamily, PlainTextParser, Prompt
from server.serving.decode import IncrementalDetokenizer, StopStrings
from server.serving.logprobs import LogprobTracker, TokenTexts
from server.types import ChatEvent, ChatRequest, CompletionRequest, Finished, ModelCard

log = logging.getLogger("glm_serve.serving")


def _grammar_param(request: ChatRequest) -> str:
    """The request field a grammar came from, for an engine's refusal of it."""
    from server.structured.formats import forced_tools

    if forced_tools(request.tools, request.tool_choice):
        return "tools"
    where = (request.response_format or {}).get("where") or "response_format"
    return "text.format" if where.startswith("text.format") else "response_format"


@dataclass
class PreparedChat:
    request: ChatRequest | CompletionRequest
    prompt: Prompt
    max_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.token_ids)


@dataclass
class _Timing:
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None


class ChatService:
    def __init__(
        self,
        family: ModelFamily,
        backend: Backend,
        *,
        model_id: str,
        aliases: Sequence[str] = (),
        request_timeout: float = 600.0,
        observer=None,
    ):
        self.family = family
        self.backend = backend
        self.model_id = model_id
        self.aliases = [a for a in dict.fromkeys(aliases) if a != model_id]
        self.request_timeout = request_timeout
        self.observer = observer  # metrics: on_first_token, on_tokens, on_finish
        self.token_texts = TokenTexts(family)  # ids -> text for logprobs, cached across requests

    @property
    def adapters(self) -> list[str]:
        return list(self.backend.adapter_names())

    @property
    def context_length(self) -> int:
        return self.backend.context_length

    async def start(self) -> None:
        await self.backend.start()

    async def stop(self) -> None:
        await self.backend.stop()

    def models(self) -> list[ModelCard]:
        n = self.context_length
        return ([ModelCard(self.model_id, context_length=n)]
                + [ModelCard(a, root=self.model_id, context_length=n) for a in self.aliases + self.adapters])

    def resolve(self, model: str | None) -> str | None:
        """The adapter a requested model id names ("" for the base model), None if it names nothing served."""
        if not model or model == self.model_id or model in self.aliases:
            return ""
        return model if model in self.adapters else None

    def prepare(self, request: ChatRequest) -> PreparedChat:
        """Render and count the prompt; raise PromptTooLong / EngineError before anything streams."""
        prompt = self.family.build_prompt(request)
        max_tokens = self._room(len(prompt.token_ids), request.sampling.max_tokens)
        if prompt.grammar is not None:  # compiled before anything is queued or streamed
            try:
                self.backend.prepare_grammar(prompt.grammar)
            except EngineError as exc:
                exc.param = exc.param or _grammar_param(request)
                raise
        return PreparedChat(request, prompt, max_tokens)

    def prepare_raw(self, request: CompletionRequest) -> PreparedChat:
        """A raw prompt (POST /v1/completions): its ids as they are, no chat template; the text comes back as
        generated (no tool-call parsing). The rest of the road (n, limits, stop strings, usage) is the chat one."""
        if not request.prompt_ids:
            raise EngineError("The prompt is empty: it must hold at least one token.", param="prompt")
        max_tokens = self._room(len(request.prompt_ids), request.sampling.max_tokens)
        return PreparedChat(request, Prompt(list(request.prompt_ids), PlainTextParser()), max_tokens)

    def encode_raw(self, text: str) -> list[int]:
        """A raw prompt's ids, as the model's own tokenizer encodes text (blocking: call it in a worker thread)."""
        return self.family.encode_raw(text)

    def _room(self, prompt_tokens: int, wanted: int | None) -> int:
        """The completion tokens a prompt leaves room for (all of `wanted`, else PromptTooLong)."""
        room = self.context_length - prompt_tokens
        if room <= 0 or (wanted is not None and wanted > room):
            raise PromptTooLong(prompt_tokens, wanted or 0, self.context_length)
        return wanted if wanted is not None else room

    def prepare_choices(self, requests: list[ChatRequest]) -> list[PreparedChat]:
        """`prepare` for the n choices of one request, which differ only in sampling: the prompt is rendered once.
        Blocking (tokenizing a long prompt takes a while): call it in a worker thread."""
        first = self.prepare(requests[0])
        # Each choice parses its own answer, so it gets a fresh parser of its own; the token ids are shared.
        fresh = [replace(first.prompt, parser=copy.deepcopy(first.prompt.parser)) for _ in requests[1:]]
        return [first] + [replace(first, request=r, prompt=p) for r, p in zip(requests[1:], fresh)]

    def chat(self, prepared: PreparedChat) -> ChatStream:
        """Queue the choice now (a full server is a 429 before any byte streams) and return its events."""
        req, prompt = prepared.request, prepared.prompt
        tokens = self.backend.generate(GenerateRequest(
            request_id=req.request_id,
            prompt_ids=prompt.token_ids,
            sampling=req.sampling,
            max_tokens=prepared.max_tokens,
            stop_token_ids=self.family.eos_token_ids | prompt.stop_token_ids,
            adapter=req.adapter or None,
            forced_prefixes=prompt.forced_prefixes,
            grammar=prompt.grammar,
        ))
        return ChatStream(self, tokens, prepared)

    def _log_done(self, prepared: PreparedChat, reason: str, completion: int, timing: _Timing) -> None:
        now = time.monotonic()
        first = timing.first_token_at
        rate = (completion - 1) / (now - first) if first and completion > 1 and now > first else 0
        log.info("%s done: %d prompt + %d completion tokens, finish=%s, ttft %.0f ms, %.1f tok/s",
                 prepared.request.request_id or "request", prepared.prompt_tokens, completion, reason,
                 ((first or now) - timing.arrival) * 1000, rate)


class ChatStream:
    """The events of one queued choice, ending with exactly one Finished. Closing it frees the backend's slot."""

    def __init__(self, service: ChatService, tokens: TokenStream, prepared: PreparedChat):
        self._service = service
        self._tokens = tokens
        self._gen = self._events(prepared)

    def __aiter__(self):
        return self

    async def __anext__(self) -> ChatEvent:
        return await self._gen.__anext__()

    def cancel(self) -> None:
        """Free the slot now, without awaiting: safe inside an already-cancelled task's cleanup."""
        self._tokens.cancel()

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()
        finally:
            await self._tokens.aclose()

    async def _events(self, prepared: PreparedChat) -> AsyncIterator[ChatEvent]:
        service, family = self._service, self._service.family
        stop_ids = family.eos_token_ids | prepared.prompt.stop_token_ids
        detok = IncrementalDetokenizer(family.decode)
        stops = StopStrings(prepared.request.sampling.stop)
        parser, observer = prepared.prompt.parser, service.observer
        timing, completion, reason = _Timing(), 0, None
        lp = LogprobTracker(service.token_texts) if prepared.request.sampling.logprobs is not None else None
        produced = kept = 0  # characters out of the detokenizer / past the stop strings: where logprobs line up
        cut = None  # where a stop string cut the text
        counted = None  # the finish the metrics count for this choice: exactly one, also when the client leaves
        try:
            try:
                async with asyncio.timeout(service.request_timeout):
                    async for chunk in self._tokens:
                        text, flush = "", False
                        for j, token in enumerate(chunk.token_ids):
                            completion += 1
                            if lp is not None:
                                lp.add(token, chunk.logprobs[j] if chunk.logprobs else None, produced)
                            if token in stop_ids:  # it ends the answer and never becomes text
                                reason, flush = "stop", True
                                break
                            raw = detok.push(token)
                            produced += len(raw)
                            piece, hit = stops.push(raw)
                            text += piece
                            if hit:
                                reason, cut = "stop", kept + len(text)
                                break
                        if chunk.token_ids:
                            self._observe(timing, len(chunk.token_ids), prepared.prompt_tokens)
                        if reason is None and chunk.finish_reason:
                            reason = chunk.finish_reason
                            flush = reason != "abort"
                        if flush:  # what the detokenizer and the stop-string matcher still hold back
                            tail, hit = stops.push(detok.flush())
                            text += tail if hit else tail + stops.flush()
                            cut = kept + len(text) if hit else cut
                        events = parser.feed(text)
                        if lp is not None:
                            if reason:
                                lp.finish(cut)
                            else:
                                lp.released(kept + len(text))
                            events = lp.attach(events)
                        kept += len(text)
                        for event in events:
                            yield event
                        if reason:
                            break
            except EngineError:
                counted = "error"
                raise
            except TimeoutError:
                counted = "error"
                raise RequestTimeout(
                    f"The request took longer than REQUEST_TIMEOUT={service.request_timeout:g}s and was aborted."
                ) from None
            finally:
                self._tokens.cancel()  # a stop string, a timeout or a client gone: free the slot now
            events, reason = parser.finish(reason or "abort")
            if lp is not None:
                events = lp.attach(events) + lp.rest()
            counted = reason
            for event in events:
                yield event
            service._log_done(prepared, reason, completion, timing)
            yield Finished(reason, prepared.prompt_tokens, completion)
        finally:
            if observer is not None:
                observer.on_finish(counted or "abort", time.monotonic() - timing.arrival)

    def _observe(self, timing: _Timing, n: int, prompt_tokens: int) -> None:
        now, observer = time.monotonic(), self._service.observer
        if timing.first_token_at is None:
            timing.first_token_at = now
            if observer is not None:
                observer.on_first_token(now - timing.arrival, prompt_tokens)
            n -= 1
        gap = now - timing.last_token_at if timing.last_token_at is not None else None
        timing.last_token_at = now
        if observer is not None:
            observer.on_tokens(n, gap)
