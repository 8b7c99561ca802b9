"""LlamaCppBackend: the token-level Backend over llama.cpp's llama-server, our supervised child.

Admission, health and failing streams are child.backend's; llama-server decodes MAX_RUNNING_REQUESTS sequences at
once (one slot each, continuous batching) and queues the rest. Cancelling a sequence closes its HTTP stream:
llama-server then cancels the slot's task (it has no abort-by-id call).
"""

from __future__ import annotations

import asyncio
import logging

from server.backends.base import GenerateRequest
from server.backends.child.backend import ChildBackend
from server.backends.child.client import engine_client, error_text
from server.backends.llamacpp.gbnf import to_gbnf
from server.backends.llamacpp.stream import LlamaStream
from server.backends.llamacpp.supervisor import LlamaSupervisor
from server.backends.llamacpp.wire import Vocab, gguf_vocab
from server.errors import EngineError, EngineFailure, EngineUnavailable

log = logging.getLogger("glm_serve.llamacpp")


class LlamaCppBackend(ChildBackend):
    name = "llamacpp"
    label = "llama.cpp"
    server_name = "llama-server"
    retry_after = 15.0  # seconds a client is told to wait while llama-server restarts (seconds for small models)

    def __init__(self, supervisor: LlamaSupervisor, *, gguf: str, context_length: int, max_running: int = 16,
                 max_waiting: int = 64, request_timeout: float = 600.0, adapters: list[str] | None = None,
                 summary: dict[str, str] | None = None):
        super().__init__(supervisor, max_running=max_running, max_waiting=max_waiting,
                         request_timeout=request_timeout)
        self.gguf = gguf
        self.context_length = context_length
        self.vocab: Vocab | None = None
        self.props: dict = {}
        self._summary = dict(summary or {})
        self._adapter_ids = {name: i for i, name in enumerate(adapters or [])}  # llama-server's --lora order

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
        upstream_id = self._admit(request)
        self._check(request)
        return self._track(LlamaStream(self, request, upstream_id))

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

    # -- what the streams call ---------------------------------------------------------------------
    def _abort_later(self, upstream_id: str) -> None:
        """Nothing to post: closing the stream (the task is cancelled) is llama-server's abort."""

    def http_error(self, status: int, body: bytes) -> EngineError:
        message = error_text(body)
        if status == 400 and "grammar" in message:  # gbnf.py should never let one through; a 400 all the same
            return EngineError(f"llama.cpp refused the structured-output grammar: {message}", code="invalid_schema")
        if status == 400:
            return EngineError(f"llama.cpp refused the request: {message}")
        if status == 503:
            return EngineUnavailable(f"llama-server is not serving: {message}", retry_after=self.retry_after)
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
