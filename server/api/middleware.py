"""Request id, access log line and request metrics, as plain ASGI middleware.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: that one wraps `receive`, which hides a client's
disconnect from the handlers (a dropped non-streaming request would keep generating for nobody).
"""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.limits import request_id

log = logging.getLogger("glm_serve.access")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics):
        self.app = app
        self.metrics = metrics

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
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "other"), str(status[0])).inc()
            if scope["path"].startswith("/v1"):
                log.info("%s %s %s %d %.0f ms", rid, scope["method"], scope["path"], status[0],
                         (time.monotonic() - started) * 1000)
