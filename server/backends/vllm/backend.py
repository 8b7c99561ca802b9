"""VLLMBackend: the token-level Backend over a vLLM server in --tokens-only mode (ours or someone else's).

The upstream (supervisor.Supervisor in launch mode, remote.Remote in connect mode) says where vLLM is and whether
it is up; this class speaks HTTP to it through one pooled client and maps vLLM's failures to our errors.
Admission, health and failing streams are child.backend's; vLLM queues what exceeds its --max-num-seqs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from server.backends.base import GenerateRequest
from server.backends.child.backend import ChildBackend
from server.backends.child.client import engine_client, error_text
from server.backends.vllm.probe import ServerInfo, running_requests, server_info
from server.backends.vllm.stream import VLLMStream
from server.backends.vllm.wire import ABORT_PATH, UPSTREAM_ID_PREFIX
from server.errors import ConfigError, EngineError, EngineFailure, EngineOverloaded, EngineUnavailable

log = logging.getLogger("glm_serve.vllm")


class VLLMBackend(ChildBackend):
    name = "vllm"
    label = "vLLM"
    server_name = "vLLM"
    retry_after = 30.0  # seconds a client is told to wait while vLLM is down (a restart takes ~1 min)

    def __init__(
        self,
        upstream,
        *,
        context_length: int,
        max_running: int = 16,
        max_waiting: int = 64,
        request_timeout: float = 600.0,
        adapters: dict[str, str] | None = None,
        vocab_size: int | None = None,
        summary: dict[str, str] | None = None,
        api_key: str = "",
    ):
        super().__init__(upstream, max_running=max_running, max_waiting=max_waiting, request_timeout=request_timeout)
        self.context_length = context_length  # from config.json until vLLM tells its own max_model_len
        self.vocab_size = vocab_size
        self.info: ServerInfo | None = None
        self._adapters = dict(adapters or {})  # served model id -> vLLM's adapter name
        self._summary = dict(summary or {})
        self._aborts: set[asyncio.Task] = set()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # a vLLM started with --api-key

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.client = engine_client(read_timeout=self.read_timeout, running=self.max_running,
                                    waiting=self.max_waiting, headers=self._headers)
        self.upstream.on_down = self._fail_all
        try:
            await self.upstream.start(self.client)
            self.info = info = await server_info(self.client, self.upstream.base_url, where=self._where())
        except BaseException:
            await self.upstream.stop()
            await self.client.aclose()
            raise
        if info.max_model_len:
            self.context_length = info.max_model_len
        missing = sorted(set(self._adapters.values()) - set(info.lora))
        if missing:
            await self.stop()
            raise ConfigError(f"{self._where()} has no LoRA adapter named {', '.join(missing)} (it has: "
                              f"{', '.join(info.lora) or 'none'}). Start vLLM with --enable-lora --lora-modules "
                              "NAME=PATH for each adapter in LORA_MODULES.")
        if not info.tokenizer_loaded:
            log.info("%s runs --tokens-only (no tokenizer): structured outputs (response_format, forced tool calls) "
                     "will be refused; start it with --enable-scale-out instead, and --tokenizer for ChatGLM3.",
                     self._where())
        self._started = True

    async def stop(self) -> None:
        self._started = False
        self._fail_all("glm-serve is shutting down")
        await self.upstream.stop()
        if self._aborts:
            await asyncio.wait(list(self._aborts), timeout=5.0)
        if self.client is not None:
            await self.client.aclose()

    # -- the seam ----------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> VLLMStream:
        upstream_id = self._admit(request)
        self._check_ids(request)
        model = None
        if request.adapter:
            if request.adapter not in self._adapters:
                raise EngineError(f"No LoRA adapter {request.adapter!r} on this server.", param="model",
                                  code="model_not_found")
            model = self._adapters[request.adapter]
        return self._track(VLLMStream(self, request, upstream_id, model))

    def prepare_grammar(self, grammar: str) -> None:
        # vLLM compiles it (asynchronously, with its own cache); glm-serve has checked the schema already.
        if self.info is not None and not self.info.tokenizer_loaded:
            raise EngineError(f"Structured outputs are not available: {self._where()} runs --tokens-only, which "
                              "loads no tokenizer, and vLLM builds its grammar vocabulary from one. Restart it with "
                              "--enable-scale-out (and --tokenizer for ChatGLM3, see the README).",
                              param="response_format")

    def adapter_names(self) -> dict[str, str]:
        return dict(self._adapters)

    def describe(self) -> list[str]:
        info, up, s = self.info, self.upstream, self._summary
        ready = f", ready in {up.ready_seconds:.1f} s" if up.ready_seconds else ""
        lines = [f"engine       vLLM {info.version if info else '?'} (token-in/token-out API), {up.describe()}{ready}",
                 f"model        {s.get('model', '?')} (vLLM name {info.model if info else '?'})   "
                 f"context {self.context_length} tokens",
                 f"placement    {s.get('placement', 'as that vLLM server was started')}",
                 f"batching     {self.max_running} running (vLLM --max-num-seqs), {self.max_waiting} more waiting "
                 "before 429" + (f"   KV cache {info.kv_cache_bytes / 2**30:.1f} GiB"
                                 if info and info.kv_cache_bytes else "")]
        if self._adapters:
            lines.append(f"lora         {s.get('lora') or ', '.join(self._adapters)}")
        return lines

    # -- what the streams call ---------------------------------------------------------------------
    def _abort_later(self, upstream_id: str) -> None:
        """POST abort_requests in the background (cancel() must not await)."""
        if self.client is None or self.client.is_closed:
            return
        task = asyncio.get_running_loop().create_task(self._abort(upstream_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, upstream_id: str) -> None:
        with contextlib.suppress(httpx.HTTPError, RuntimeError):
            await self.client.post(self.url(ABORT_PATH), json={"request_ids": [UPSTREAM_ID_PREFIX + upstream_id]},
                                   timeout=5.0)

    def http_error(self, status: int, body: bytes) -> EngineError:
        message = error_text(body)
        if status == 400:
            return EngineError(f"vLLM refused the request: {message}")
        if status == 429:
            return EngineOverloaded(f"vLLM is at capacity: {message}")
        if status == 503 or "EngineCore" in message or "EngineDead" in message:
            return EngineUnavailable(f"vLLM is not serving: {message}", retry_after=self.retry_after)
        return EngineFailure(f"vLLM answered {status}: {message}")

    def _check_ids(self, request: GenerateRequest) -> None:
        # vLLM 0.32 does not range-check ids on this API: one id past the embedding kills its engine (seen here).
        if not request.prompt_ids:
            raise EngineError("The prompt is empty: vLLM needs at least one token.")
        limit = self.vocab_size
        ids = [*request.prompt_ids, *(t for p in request.forced_prefixes for t in p)]
        bad = [t for t in ids if t < 0 or (limit is not None and t >= limit)]
        if bad:
            raise EngineError(f"Token id {bad[0]} is outside the model's vocabulary"
                              + (f" (0..{limit - 1})." if limit is not None else "."),
                              param="prompt" if bad[0] in request.prompt_ids else None)
        bad = [t for t in request.sampling.logit_bias if t < 0 or (limit is not None and t >= limit)]
        if bad:
            raise EngineError(f"logit_bias names token id {bad[0]}, outside the model's vocabulary"
                              + (f" (0..{limit - 1})." if limit is not None else "."), param="logit_bias")

    def _where(self) -> str:
        return f"the vLLM at {self.upstream.base_url}"

    async def upstream_requests(self) -> tuple[float, float]:
        """vLLM's own running and waiting gauges (its /metrics): what an abort must bring down."""
        return await running_requests(self.client, self.upstream.base_url)
