"""Request bounds enforced before any route runs: body size (413), body read time (408) and a sane request id.

The body limit is a pure ASGI middleware that reads the body itself, up to the limit, and replays it to the
app. Checking Content-Length alone is not enough (chunked uploads have none, and a client may lie), and
stopping the read from inside the app would go through FastAPI's body parsing, which turns any error there
into a vague 400. Reading up front costs nothing extra: every route with a body parses all of it anyway.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError

log = logging.getLogger("glm_serve.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id(client_value: str | None) -> str:
    """The client's X-Request-ID when it is plain (log- and header-safe), else a fresh one."""
    if client_value and _REQUEST_ID.fullmatch(client_value):
        return client_value
    return f"req-{uuid.uuid4().hex[:12]}"


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit} bytes; "
                    "MAX_REQUEST_BYTES).", code="request_too_large")


def body_too_slow(timeout: float) -> APIError:
    # The rest of the body is still on its way: the connection cannot carry another request.
    return APIError(408, f"The request body did not arrive within {timeout:g} s (BODY_READ_TIMEOUT).",
                    code="request_timeout", headers={"Connection": "close"})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 60.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout  # for the whole body: a client trickling a byte at a time must not hold a request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:  # uvicorn already refuses these; kept for other servers
                await APIError(400, "Invalid Content-Length header.", code="invalid_request").response()(
                    scope, receive, send)
                return
            if size > self.max_bytes:
                await too_large(self.max_bytes).response()(scope, receive, send)
                return
        elif scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)  # no body to bound (and none is read)
            return

        chunks: list[bytes] = []
        total = 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left before sending its body: nobody to answer
                    total += len(message.get("body", b""))
                    if total > self.max_bytes:
                        await too_large(self.max_bytes).response()(scope, receive, send)
                        return
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            log.info("%s %s %s: the request body took over %g s (BODY_READ_TIMEOUT); answered 408",
                        scope.get("state", {}).get("request_id", "-"), scope["method"], scope["path"], self.timeout)
            await body_too_slow(self.timeout).response()(scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect, which streaming responses watch for

        await self.app(scope, replay, send)
