"""LlamaCppBackend: the token-level Backend over llama.cpp's llama-server, our supervised child.

Admission is ours, as on the other engines: MAX_RUNNING_REQUESTS + MAX_WAITING_REQUESTS sequences in flight, then
EngineOverloaded (429) before any byte; llama-server decodes MAX_RUNNING_REQUESTS of them at once (one slot each,
continuous batching) and queues the rest. Cancelling a sequence closes its HTTP stream: llama-server then cancels
the slot's task (it has no abort-by-id call).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid

import httpx
import orjson

from server.backends.base import Capacity, GenerateRequest
from server.backends.child.client import engine_client
from server.backends.llamacpp.gbnf import to_gbnf
from server.backends.llamacpp.stream import LlamaStream
from server.backends.llamacpp.supervisor import LlamaSupervisor
from server.backends.llamacpp.wire import Vocab, error_message, gguf_vocab
from server.errors import EngineError, EngineFailure, EngineOverloaded, EngineUnavailable

log = logging.getLogger("glm_serve.llamacpp")

RESTART_RETRY_AFTER = 15.0  # seconds a client is told to wait while llama-server restarts (seconds for small models)


class LlamaCppBackend:
    name = "llamacpp"
    label = "llama.cpp"

    def __init__(self, supervisor: LlamaSupervisor, *, gguf: str, context_length: int, max_running: int = 16,
                 max_waiting: int = 64, request_timeout: float = 600.0, adapters: list[str] | None = None,
                 summary: dict[str, str] | None = None):
        self.upstream = supervisor
        self.gguf = gguf
        self.context_length = context_length
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.read_timeout = request_timeout
        self.client: httpx.AsyncClient | None = None
        self.vocab: Vocab | None = None
        self.props: dict = {}
        self._summary = dict(summary or {})
        self._adapter_ids = {name: i for i, name in enumerate(adapters or [])}  # llama-server's --lora order
        self._streams: set[LlamaStream] = set()
        self._ids = itertools.count(1)
        self._tag = uuid.uuid4().hex[:8]
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.client = engine_client(read_timeout=self.read_timeout, running=self.max_running,
                                    waiting=self.max_waiting,
                                    headers={"Authorization": f"Bearer {self.upstream.api_key}"})
        self.upstream.on_down = self._fail_all
        try:
            self.vocab = await asyncio.to_thread(gguf_vocab, self.gguf)
            await self.upstream.start(self.client)
            self.props = (await self.client.get(self.url("/props"), timeout=30)).json()
            await self._check_adapters()
        except BaseException:
            await self.upstream.stop()
            await self.client.aclose()
            raise
        n_ctx = (self.props.get("default_generation_settings") or {}).get("n_ctx")
        if isinstance(n_ctx, int) and 0 < n_ctx < self.context_length:
            log.warning("llama-server gives each slot %d tokens of context, less than the model's %d: requests are "
                        "checked against %d (raise it with LLAMACPP_ARGS=\"--ctx-size N\").", n_ctx,
                        self.context_length, n_ctx)
            self.context_length = n_ctx
        self._started = True

    async def stop(self) -> None:
        self._started = False
        self._fail_all("glm-serve is shutting down")
        await self.upstream.stop()
        if self.client is not None:
            await self.client.aclose()

    # -- the seam ----------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> LlamaStream:
        if reason := self.health():
            raise EngineUnavailable(reason, retry_after=RESTART_RETRY_AFTER)
        if len(self._streams) >= self.max_running + self.max_waiting:
            raise EngineOverloaded(f"The server is at capacity ({self.max_running} running and "
                                   f"{self.max_waiting} waiting requests); retry shortly.")
        self._check(request)
        stream = LlamaStream(self, request, f"{request.request_id or 'seq'}-{self._tag}{next(self._ids)}")
        self._streams.add(stream)
        return stream

    def prepare_grammar(self, grammar: str) -> None:
        """Our grammar (xgrammar EBNF) as llama.cpp's GBNF, translated and cached before anything is queued: what
        GBNF cannot express is a 400 here (gbnf.py). Not llama-server's own json_schema: it would accept a
        different set of schemas than the other engines."""
        to_gbnf(grammar)

    def adapter_names(self) -> dict[str, str]:
        return {name: name for name in self._adapter_ids}

    def lora_field(self, adapter: str | None) -> list[dict] | None:
        """/completion's `lora` for a request: its adapter at scale 1, every other at 0 (all 0 for the base model),
        so a slot never keeps the adapters of the request it served before. None when no adapter is loaded."""
        if not self._adapter_ids:
            return None
        chosen = self._adapter_ids.get(adapter) if adapter else None
        return [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in self._adapter_ids.values()]

    async def _check_adapters(self) -> None:
        """llama-server's adapter ids are the --lora order; LLAMACPP_ARGS may add its own after ours."""
        if not self._adapter_ids:
            return
        listed = (await self.client.get(self.url("/lora-adapters"), timeout=30)).json()
        ours = self.upstream.loras
        got = [(a.get("id"), a.get("path")) for a in listed[: len(ours)]]
        if got != list(enumerate(ours)):
            raise EngineFailure(f"llama-server lists its LoRA adapters as {got}, not the {list(enumerate(ours))} "
                                "glm-serve started it with.")

    def capacity(self) -> Capacity:
        n = len(self._streams)
        return Capacity(running=min(n, self.max_running), waiting=max(0, n - self.max_running),
                        max_running=self.max_running, max_waiting=self.max_waiting)

    def health(self) -> str | None:
        return self.upstream.down_reason() if self._started else "llama.cpp is not started"

    def describe(self) -> list[str]:
        up, s = self.upstream, self._summary
        ready = f", ready in {up.ready_seconds:.1f} s" if up.ready_seconds else ""
        install = up.install
        build = f"llama.cpp build {install.version} from {install.source}" if install else "llama.cpp"
        lines = [f"engine       {build} (llama-server /completion on token ids), {up.describe()}{ready}",
                 f"model        {self.gguf}   context {self.context_length} tokens" + (
                     f"   ({s['why_gguf']})" if s.get("why_gguf") else ""),
                 f"batching     {self.max_running} slots decoded together (continuous batching, one shared KV pool),"
                 f" {self.max_waiting} more waiting before 429" + (
                     f"   LLAMACPP_ARGS {s['args']}" if s.get("args") else "")]
        if s.get("lora"):  # llama-server decodes together only the slots whose adapter scales are equal
            lines.append(f"lora         {s['lora']}")
        return lines

    # -- helpers for the streams -------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"{self.upstream.base_url}{path}"

    def _release(self, stream: LlamaStream) -> None:
        self._streams.discard(stream)

    def _abort_later(self, upstream_id: str) -> None:
        """Nothing to post: closing the stream (the task is cancelled) is llama-server's abort."""

    def _fail_all(self, reason: str) -> None:
        for stream in list(self._streams):
            stream.fail(EngineUnavailable(reason, retry_after=RESTART_RETRY_AFTER))

    def connection_lost(self, exc: BaseException) -> EngineUnavailable:
        down = self.upstream.down_reason()
        why = down or f"lost the connection to llama-server at {self.upstream.base_url} ({type(exc).__name__}: {exc})"
        return EngineUnavailable(why, retry_after=RESTART_RETRY_AFTER)

    def http_error(self, status: int, body: bytes) -> EngineError:
        try:
            message = error_message(orjson.loads(body))
        except orjson.JSONDecodeError:
            message = body[:300].decode("utf-8", "replace")
        if status == 400 and "grammar" in message:  # gbnf.py should never let one through; a 400 all the same
            return EngineError(f"llama.cpp refused the structured-output grammar: {message}", code="invalid_schema")
        if status == 400:
            return EngineError(f"llama.cpp refused the request: {message}")
        if status == 503:
            return EngineUnavailable(f"llama-server is not serving: {message}", retry_after=RESTART_RETRY_AFTER)
        return EngineFailure(f"llama-server answered {status}: {message}")

    def _check(self, request: GenerateRequest) -> None:
        if not request.prompt_ids:
            raise EngineError("The prompt is empty: llama.cpp needs at least one token.")
        if request.adapter and request.adapter not in self._adapter_ids:
            raise EngineError(f"No LoRA adapter {request.adapter!r} on this server.", param="model",
                              code="model_not_found")
        sampling = request.sampling
        if getattr(sampling, "logprobs", None) is not None:
            raise EngineError("logprobs are not available on ENGINE=llamacpp yet; use ENGINE=native or vllm.",
                              param="logprobs")
        limit = len(self.vocab.pieces) if self.vocab else None
        span = f" (0..{limit - 1})." if limit is not None else "."
        for param, ids in (("prompt", [*request.prompt_ids, *(t for p in request.forced_prefixes for t in p)]),
                           ("logit_bias", [int(t) for t in (getattr(sampling, "logit_bias", None) or {})])):
            bad = [t for t in ids if t < 0 or (limit is not None and t >= limit)]
            if bad:
                raise EngineError(f"Token id {bad[0]} is outside the model's vocabulary{span}", param=param)
