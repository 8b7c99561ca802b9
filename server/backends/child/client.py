"""The HTTP client glm-serve talks to an engine server with (vLLM, llama-server): one pool per backend.

Idle pooled connections expire after 2 s. Both engines' servers close an idle keep-alive connection after 5 s
(uvicorn's default in vLLM, cpp-httplib's in llama-server), and so did httpx's pool: with equal clocks, and the
server's starting first (from when it sent a response, ours from when we finished reading it), the server could
close a connection in the same moment we reused it, and that sequence was lost (`ReadError`, seen once in a
1,000-request soak on vLLM). Expiring well before the server does means a reused connection is never one the
server is closing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

KEEPALIVE_EXPIRY = 2.0  # seconds; under the engines' 5 s server-side keep-alive, with room for a busy loop


def engine_client(*, read_timeout: float, running: int, waiting: int, headers: dict[str, str]) -> httpx.AsyncClient:
    httpx_log = logging.getLogger("httpx")
    if httpx_log.level == logging.NOTSET:  # its INFO line per request would log every 2 s health poll
        httpx_log.setLevel(logging.WARNING)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=10.0, read=read_timeout, write=30.0, pool=30.0),
        # a connection per stream (running and waiting ones hold theirs), plus health polls, aborts and picks
        limits=httpx.Limits(max_connections=running + waiting + 16, max_keepalive_connections=running + 8,
                            keepalive_expiry=KEEPALIVE_EXPIRY),
        headers=headers,
    )


def split_lines(buffer: bytes) -> tuple[list[str], bytes]:
    """The complete lines in `buffer` (split on line feeds only, a trailing CR dropped) and what is left over."""
    *lines, rest = buffer.split(b"\n")
    return [line.removesuffix(b"\r").decode("utf-8") for line in lines], rest


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """An engine's event stream, line by line. Not httpx's aiter_lines: that splits as str.splitlines does, on
    U+0085, U+2028 and U+2029 too, which JSON leaves unescaped in a string, so a token that is one of them (ChatGLM3
    has a token for each) cut its event in two and the sequence failed on a JSONDecodeError."""
    rest = b""
    async for chunk in response.aiter_bytes():
        lines, rest = split_lines(rest + chunk)
        for line in lines:
            yield line
    if rest:
        yield rest.removesuffix(b"\r").decode("utf-8")


def error_message(payload: Any) -> str:
    """The message of an engine's error JSON: {"error": {"message": ...}} (vLLM, llama-server), {"error": "..."}, or
    FastAPI's {"detail": ...}."""
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        if payload.get("detail"):
            return str(payload["detail"])
    return str(payload)[:500]


def error_text(body: bytes) -> str:
    """An engine's HTTP error body as a message: its error JSON's, else the start of the body."""
    try:
        return error_message(orjson.loads(body))
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace")
