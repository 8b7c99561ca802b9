"""LocalChatEngine: the ChatEngine the API layer talks to, over one loaded model and its scheduler."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace

from server.backends.native.loader import LoadedModel
from server.backends.native.scheduler import Scheduler, Sequence, StepOutput
from server.errors import EngineFailure, PromptTooLong, RequestTimeout
from server.families.base import Prompt
from server.types import ChatEvent, ChatRequest, Finished, ModelCard

log = logging.getLogger("glm_serve.engine")


@dataclass
class PreparedChat:
    request: ChatRequest
    prompt: Prompt
    max_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt.token_ids)


class LocalChatEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        model_id: str,
        aliases: list[str] | None = None,
        adapters: list[str] | Mapping[str, str] | None = None,
        max_running: int = 16,
        max_waiting: int = 64,
        max_prefill_tokens: int = 0,
        request_timeout: float = 600.0,
        logits_hook=None,
        observer=None,
    ):
        self.loaded = loaded
        self.family = loaded.family
        self.model_id = model_id
        self.aliases = [a for a in dict.fromkeys(aliases or []) if a != model_id]
        # served model id -> peft adapter name (they differ where the id holds a '.', which peft cannot take)
        self._adapter_keys = dict(adapters) if isinstance(adapters, Mapping) else {a: a for a in adapters or []}
        self.adapters = list(self._adapter_keys)
        self.context_length = loaded.context_length
        self.request_timeout = request_timeout
        self.observer = observer
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scheduler = Scheduler(
            loaded.model,
            self.family.decode,
            device=loaded.model.device,
            vocab_size=loaded.vocab_size,
            publish=self._publish,
            max_running=max_running,
            max_waiting=max_waiting,
            max_prefill_tokens=max_prefill_tokens,
            logits_hook=logits_hook,
            observer=observer,
        )

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.scheduler.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.scheduler.stop)

    # -- ChatEngine ------------------------------------------------------------------------------
    def models(self) -> list[ModelCard]:
        cards = [ModelCard(self.model_id, context_length=self.context_length)]
        cards += [ModelCard(a, root=self.model_id, context_length=self.context_length) for a in self.aliases]
        cards += [ModelCard(a, root=self.model_id, context_length=self.context_length) for a in self.adapters]
        return cards

    def resolve(self, model: str | None) -> str | None:
        if not model or model == self.model_id or model in self.aliases:
            return ""
        if model in self.adapters:
            return model
        return None

    def prepare(self, request: ChatRequest) -> PreparedChat:
        prompt = self.family.build_prompt(request)
        n = len(prompt.token_ids)
        room = self.context_length - n
        wanted = request.sampling.max_tokens
        if room <= 0 or (wanted is not None and wanted > room):
            raise PromptTooLong(n, wanted or 0, self.context_length)
        return PreparedChat(request, prompt, wanted if wanted is not None else room)

    def prepare_choices(self, requests: list[ChatRequest]) -> list[PreparedChat]:
        first = self.prepare(requests[0])
        # Each choice parses its own answer, so it gets a fresh parser of its own; the token ids are shared.
        fresh = [replace(first.prompt, parser=copy.deepcopy(first.prompt.parser)) for _ in requests[1:]]
        return [first] + [replace(first, request=r, prompt=p) for r, p in zip(requests[1:], fresh)]

    def chat(self, prepared: PreparedChat) -> ChatStream:
        """Queue the request now (so overload is a 429 before any byte streams) and return its events."""
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        req = prepared.request
        seq = Sequence(
            prompt_ids=prepared.prompt.token_ids,
            params=req.sampling,
            max_tokens=prepared.max_tokens,
            stop_token_ids=self.family.eos_token_ids | prepared.prompt.stop_token_ids,
            sink=queue.put_nowait,
            adapter=self._adapter_keys.get(req.adapter) if req.adapter else None,
            request_id=req.request_id,
            forced_prefixes=prepared.prompt.forced_prefixes,
        )
        self.scheduler.submit(seq)  # raises EngineOverloaded
        return ChatStream(self, seq, queue, prepared)

    async def _events(self, seq: Sequence, queue: asyncio.Queue, prepared: PreparedChat) -> AsyncIterator[ChatEvent]:
        parser = prepared.prompt.parser
        try:
            async with asyncio.timeout(self.request_timeout):
                while True:
                    out = await queue.get()
                    if out.finish_reason == "error":
                        raise EngineFailure(f"Generation failed: {out.error}")
                    for event in parser.feed(out.text):
                        yield event
                    if out.finish_reason:
                        events, reason = parser.finish(out.finish_reason)
                        for event in events:
                            yield event
                        self._log_done(seq, reason)
                        yield Finished(reason, prepared.prompt_tokens, out.completion_tokens)
                        return
        except TimeoutError:
            raise RequestTimeout(
                f"The request took longer than REQUEST_TIMEOUT={self.request_timeout:g}s and was aborted."
            ) from None
        finally:
            if not seq.finished:
                self.scheduler.cancel(seq)  # client went away or timed out: free the slot

    # -- plumbing ----------------------------------------------------------------------------------
    def _publish(self, outputs: list[tuple[Sequence, StepOutput]]) -> None:
        """Engine thread -> event loop, once per step for the whole batch."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[tuple[Sequence, StepOutput]]) -> None:
        for seq, out in outputs:
            seq.sink(out)
            if self.observer is not None:
                self.observer.on_output(seq, out)

    def _log_done(self, seq: Sequence, reason: str) -> None:
        now = time.monotonic()
        ttft = (seq.first_token_at or now) - seq.arrival
        n = len(seq.generated)
        rate = (n - 1) / (now - seq.first_token_at) if seq.first_token_at and n > 1 and now > seq.first_token_at else 0
        log.info("%s done: %d prompt + %d completion tokens, finish=%s, ttft %.0f ms, %.1f tok/s",
                 seq.request_id or "request", len(seq.prompt_ids), n, reason, ttft * 1000, rate)


class ChatStream:
    """The events of one queued choice. Closing it, even before the first event, frees the slot."""

    def __init__(self, engine: LocalChatEngine, seq: Sequence, queue: asyncio.Queue, prepared: PreparedChat):
        self._seq = seq
        self._scheduler = engine.scheduler
        self._gen = engine._events(seq, queue, prepared)

    def __aiter__(self):
        return self

    async def __anext__(self) -> ChatEvent:
        return await self._gen.__anext__()

    def cancel(self) -> None:
        """Free the slot now, without awaiting: safe inside an already-cancelled task's cleanup."""
        if not self._seq.finished:
            self._scheduler.cancel(self._seq)

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()
        finally:
            if not self._seq.finished:
                self._scheduler.cancel(self._seq)
