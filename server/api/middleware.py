"""Request id, access log line, request metrics and the bound on a write to a client that does not read, as plain
ASGI middleware.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: that one wraps `receive`, which hides a client's
disconnect from the handlers (a dropped non-streaming request would keep generating for nobody).
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.limits import request_id

log = logging.getLogger("glm_serve.access")


class ClientTooSlow(Exception):
    """A write to the client waited longer than STREAM_SEND_TIMEOUT: it does not read what it asked for."""


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics, send_timeout: float):
        self.app = app
        self.metrics = metrics
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(Headers(scope=scope).get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid
        started = time.monotonic()
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            # uvicorn's send waits while the socket's buffers are full, i.e. for as long as the client does not
            # read: unbounded, that holds the request (and a stream's engine slot) for ever.
            try:
                async with asyncio.timeout(self.send_timeout):
                    await send(message)
            except TimeoutError:
                raise ClientTooSlow from None

        try:
            await self.app(scope, receive, send_with_id)
        except ClientTooSlow:
            # The generation was cancelled on the way out (the stream's cleanup frees its slot); the response
            # cannot be finished, so uvicorn closes the connection ("returned without completing response").
            self.metrics.slow_client_aborts.inc()
            log.warning("%s %s %s aborted: the client stopped reading (a write waited over %g s, "
                        "STREAM_SEND_TIMEOUT)", rid, scope["method"], scope["path"], self.send_timeout)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "other"), str(status[0])).inc()
            if scope["path"].startswith("/v1"):
                log.info("%s %s %s %d %.0f ms", rid, scope["method"], scope["path"], status[0],
                         (time.monotonic() - started) * 1000)
