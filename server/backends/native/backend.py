"""NativeBackend: the token-level Backend over one loaded transformers model and our scheduler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from server.backends.base import Capacity, GenerateRequest, TokenChunk
from server.backends.native.loader import LoadedModel
from server.backends.native.scheduler import Scheduler, Sequence, StepOutput
from server.errors import EngineError, EngineFailure
from server.structured.matcher import Grammars


class NativeBackend:
    name = "native"

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        adapters: Mapping[str, str] | None = None,
        max_running: int = 16,
        max_waiting: int = 64,
        max_prefill_tokens: int = 0,
    ):
        self.loaded = loaded
        self.context_length = loaded.context_length
        # served model id -> peft adapter name (they differ where the id holds a '.', which peft cannot take)
        self._adapters = dict(adapters or {})
        self._loop: asyncio.AbstractEventLoop | None = None
        self.scheduler = Scheduler(
            loaded.model,
            device=loaded.model.device,
            vocab_size=loaded.vocab_size,
            publish=self._publish,
            max_running=max_running,
            max_waiting=max_waiting,
            max_prefill_tokens=max_prefill_tokens,
        )
        self.grammars = Grammars(loaded.family, loaded.vocab_size, loaded.family.eos_token_ids)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.scheduler.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.scheduler.stop)

    def generate(self, request: GenerateRequest) -> NativeStream:
        queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        bad = [t for t in request.prompt_ids if not 0 <= t < self.loaded.vocab_size]
        if bad:  # a raw token-id prompt (/v1/completions): the embedding lookup would fail mid-batch
            raise EngineError(f"Token id {bad[0]} in the prompt is outside the model's vocabulary "
                              f"(0..{self.loaded.vocab_size - 1}).", param="prompt")
        bad = [t for t in request.sampling.logit_bias if not 0 <= t < self.loaded.vocab_size]
        if bad:
            raise EngineError(f"logit_bias names token id {bad[0]}, outside the model's vocabulary "
                              f"(0..{self.loaded.vocab_size - 1}).", param="logit_bias")
        seq = Sequence(
            prompt_ids=request.prompt_ids,
            params=request.sampling,
            max_tokens=request.max_tokens,
            stop_token_ids=request.stop_token_ids,
            sink=queue.put_nowait,
            adapter=self._adapters.get(request.adapter) if request.adapter else None,
            request_id=request.request_id,
            forced_prefixes=[list(p) for p in request.forced_prefixes],
            # compiled in prepare_grammar already: this is a cache lookup
            grammar=self.grammars.matcher(request.grammar, request.stop_token_ids) if request.grammar else None,
        )
        self.scheduler.submit(seq)  # raises EngineOverloaded
        return NativeStream(self.scheduler, seq, queue)

    def prepare_grammar(self, grammar: str) -> None:
        self.grammars.compile(grammar)

    def adapter_names(self) -> dict[str, str]:
        return dict(self._adapters)

    def capacity(self) -> Capacity:
        s = self.scheduler
        return Capacity(running=s.num_running, waiting=s.num_waiting, max_running=s.max_running,
                        max_waiting=s.max_waiting, kv_cache_bytes=s.kv.nbytes())

    def health(self) -> str | None:
        return None  # in-process: if the scheduler thread could not run, requests fail with its error

    def describe(self) -> list[str]:
        loaded, p, s = self.loaded, self.loaded.placement, self.scheduler
        quant = p.quantization_config
        return [
            f"engine       native (continuous batching on transformers {_transformers_version()})",
            f"device       {p.describe()}   dtype {str(p.dtype).removeprefix('torch.')}"
            + (f"   quantization {_quant_name(quant)}" if quant is not None else ""),
            f"weights      {loaded.weight_bytes / 2**20:,.0f} MiB   context {loaded.context_length} tokens"
            f"   loaded in {loaded.load_seconds:.1f} s",
            f"batching     {s.max_running} running, {s.max_waiting} waiting, "
            f"prefill chunks {s.max_prefill_tokens or 'off'}",
        ]

    # -- engine thread -> event loop ---------------------------------------------------------------
    def _publish(self, outputs: list[tuple[Sequence, StepOutput]]) -> None:
        """Called on the engine thread once per step for the whole batch."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_dispatch, outputs)


def _dispatch(outputs: list[tuple[Sequence, StepOutput]]) -> None:
    for seq, out in outputs:
        seq.sink(out)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _quant_name(config) -> str:
    return "8bit" if getattr(config, "load_in_8bit", False) else "4bit"


class NativeStream:
    """The chunks of one queued sequence. Closing it, even before the first chunk, frees the slot."""

    def __init__(self, scheduler: Scheduler, seq: Sequence, queue: asyncio.Queue[StepOutput]):
        self._scheduler = scheduler
        self._seq = seq
        self._gen = self._chunks(queue)

    def __aiter__(self) -> AsyncIterator[TokenChunk]:
        return self

    async def __anext__(self) -> TokenChunk:
        return await self._gen.__anext__()

    async def _chunks(self, queue: asyncio.Queue[StepOutput]) -> AsyncIterator[TokenChunk]:
        while True:
            out = await queue.get()
            if out.finish_reason == "error":
                raise EngineFailure(f"Generation failed: {out.error}")
            yield TokenChunk(out.token_ids, out.finish_reason, out.logprobs)
            if out.finish_reason:
                return

    def cancel(self) -> None:
        if not self._seq.finished:
            self._scheduler.cancel(self._seq)

    async def aclose(self) -> None:
        try:
            await self._gen.aclose()
        finally:
            self.cancel()
