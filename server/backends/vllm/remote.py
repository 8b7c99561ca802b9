"""Connect mode (VLLM_URL): a vLLM that someone else runs (one box, or vLLM's own multi-GPU / multi-node setup).

We never start or restart it; we only watch it. /health is polled: a refused connection marks it down at once, a
slow or failing /health after 3 polls in a row; either way in-flight streams fail with EngineUnavailable instead of
waiting, and health() says why until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx

from server.errors import ConfigError

log = logging.getLogger("glm_serve.vllm")

POLL_INTERVAL = 2.0
POLL_TIMEOUT = 10.0
POLL_FAILURES = 3


class Remote:
    def __init__(self, url: str):
        self.base_url = url.rstrip("/")
        self.on_down: Callable[[str], None] | None = None
        self.pid = None
        self.ready_seconds = None
        self.restarts = 0
        self._reason: str | None = "vLLM is not checked yet"
        self._client: httpx.AsyncClient | None = None
        self._poll: asyncio.Task | None = None

    def down_reason(self) -> str | None:
        return self._reason

    def describe(self) -> str:
        return f"connected to {self.base_url} (not started by glm-serve)"

    async def start(self, client: httpx.AsyncClient) -> None:
        self._client = client
        why = await self._check()
        if why:
            raise ConfigError(f"VLLM_URL={self.base_url}: {why}. Start vLLM there with --tokens-only, or fix the URL.")
        self._reason = None
        self._poll = asyncio.create_task(self._watch(), name="vllm-remote-health")

    async def stop(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll

    async def _check(self) -> str | None:
        """None if /health answers 200, else why not."""
        try:
            response = await self._client.get(f"{self.base_url}/health", timeout=POLL_TIMEOUT)
        except httpx.ConnectError as exc:
            return f"connection refused or unreachable ({exc})"
        except httpx.HTTPError as exc:
            return f"GET /health failed ({type(exc).__name__}: {exc})"
        return None if response.status_code == 200 else f"GET /health answered {response.status_code}"

    async def _watch(self) -> None:
        misses = 0
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            why = await self._check()
            if why is None:
                if self._reason is not None:
                    log.info("vLLM at %s answers again", self.base_url)
                misses, self._reason = 0, None
                continue
            misses += 1
            if self._reason is None and (misses >= POLL_FAILURES or why.startswith("connection refused")):
                self._reason = f"vLLM at {self.base_url} is down: {why}"
                log.error("%s; in-flight requests fail with 503", self._reason)
                if self.on_down is not None:
                    self.on_down(self._reason)
