"""What a backend over an engine served beside us (vLLM, llama.cpp's llama-server) does whichever engine it is:
admission (MAX_RUNNING_REQUESTS + MAX_WAITING_REQUESTS sequences in flight, then EngineOverloaded, a 429 before
any byte), capacity and health from the upstream, every open stream failed at once when the engine goes down, and
a lost connection as EngineUnavailable with Retry-After. Each engine's backend subclasses it and keeps what is its
own: start and stop, the request checks, adapters, how its HTTP errors read, the startup summary.
"""

from __future__ import annotations

import itertools
import uuid

import httpx

from server.backends.base import Capacity, GenerateRequest
from server.backends.child.stream import EngineStream
from server.errors import EngineOverloaded, EngineUnavailable


class ChildBackend:
    label: str  # how errors and summaries name the engine ("vLLM", "llama.cpp")
    server_name: str  # how its server is named when the connection is lost ("vLLM", "llama-server")
    retry_after: float  # seconds a client is told to wait while the engine is down

    def __init__(self, upstream, *, max_running: int, max_waiting: int, request_timeout: float):
        self.upstream = upstream  # where the engine is and whether it is up (a supervisor, or a remote vLLM)
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.read_timeout = request_timeout
        self.client: httpx.AsyncClient | None = None
        self._streams: set[EngineStream] = set()
        self._ids = itertools.count(1)
        self._tag = uuid.uuid4().hex[:8]  # upstream ids stay unique when several glm-serve share one engine
        self._started = False

    def _admit(self, request: GenerateRequest) -> str:
        """The upstream id of a new sequence, or the 503 / 429 that refuses it."""
        if reason := self.health():
            raise EngineUnavailable(reason, retry_after=self.retry_after)
        if len(self._streams) >= self.max_running + self.max_waiting:
            raise EngineOverloaded(f"The server is at capacity ({self.max_running} running and "
                                   f"{self.max_waiting} waiting requests); retry shortly.")
        return f"{request.request_id or 'seq'}-{self._tag}{next(self._ids)}"

    def _track(self, stream: EngineStream) -> EngineStream:
        self._streams.add(stream)
        return stream

    def capacity(self) -> Capacity:
        n = len(self._streams)
        return Capacity(running=min(n, self.max_running), waiting=max(0, n - self.max_running),
                        max_running=self.max_running, max_waiting=self.max_waiting)

    def health(self) -> str | None:
        return self.upstream.down_reason() if self._started else f"{self.label} is not started"

    # -- what the streams call ---------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"{self.upstream.base_url}{path}"

    def _release(self, stream: EngineStream) -> None:
        self._streams.discard(stream)

    def _fail_all(self, reason: str) -> None:
        for stream in list(self._streams):
            stream.fail(EngineUnavailable(reason, retry_after=self.retry_after))

    def connection_lost(self, exc: BaseException) -> EngineUnavailable:
        why = self.upstream.down_reason() or (f"lost the connection to {self.server_name} at "
                                              f"{self.upstream.base_url} ({type(exc).__name__}: {exc})")
        return EngineUnavailable(why, retry_after=self.retry_after)
