"""Slow and stuck clients on loopback, with raw sockets: each limit is a setting, and each test is bounded in time.

One real server (the tiny ChatGLM3, native engine: these limits live in the HTTP layer, the same on every engine)
with every limit short: STREAM_SEND_TIMEOUT, BODY_READ_TIMEOUT, HEADER_READ_TIMEOUT 2 s, KEEP_ALIVE_TIMEOUT 1 s.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import CHATGLM3_FIXTURES, running_server

LIMIT = 2.0
ENV = {"DTYPE": "float32", "EMBEDDING_PATH": "none", "WEB_UI": "false", "SERVED_MODEL_NAME": "chatglm3-6b",
       "MODEL_PATH": str(CHATGLM3_FIXTURES / "tiny-chatglm3"), "STREAM_SEND_TIMEOUT": str(LIMIT),
       "BODY_READ_TIMEOUT": str(LIMIT), "HEADER_READ_TIMEOUT": str(LIMIT), "KEEP_ALIVE_TIMEOUT": "1"}


@pytest.fixture(scope="module")
def srv():
    with running_server(ENV, name="slow-clients") as s:
        yield s


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole response with a Content-Length (the error answers here), and the status line's code."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes `sock` (recv returns b"" or the connection is reset); fails after `seconds`."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for over {seconds} s")
    return time.monotonic() - started


def test_slow_reader_is_aborted_its_slot_freed_and_counted(srv):
    """A client reading an SSE stream at 16 bytes/s: once the socket's buffers are full, one write waits for
    STREAM_SEND_TIMEOUT, then the request is aborted (engine slot freed), logged and counted.

    The kernel grows the server's send buffer towards a stalled reader (to ~400 KiB here), so the abort comes once
    the stream has produced ~500 KB: seconds on a quiet machine, minutes on a CPU shared by four test runs."""
    before = metric(srv.url, "glm_serve_slow_client_aborts_total")
    sock = socket.socket()
    # A small receive window and segment size: the kernel sizes the server's send buffer from them, so the
    # buffers on the way (that, uvicorn's 64 KiB, ours) are full after ~100 KiB instead of megabytes on loopback,
    # and the 16 choices x 480 tokens asked for (~1.5 MB of SSE) overflow them many times.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", srv.port))
    body = json.dumps({"model": "chatglm3-6b", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                       "n": 16, "max_tokens": 480, "temperature": 1.0, "seed": 1}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    started = time.monotonic()
    received = b""
    aborted_after = None
    while time.monotonic() - started < 300:
        received += sock.recv(8)
        time.sleep(0.5)
        if metric(srv.url, "glm_serve_slow_client_aborts_total") > before:
            aborted_after = time.monotonic() - started
            break
    assert aborted_after is not None, f"not aborted after 300 s at 16 B/s ({len(received)} bytes read)"
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    # The engine slot is free: nothing running although 16 x 480 tokens were asked for.
    deadline = time.monotonic() + 10
    while metric(srv.url, "glm_serve_running_requests") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(srv.url, "glm_serve_running_requests") == 0
    # What was already buffered still arrives, then the server closes the connection: no [DONE], no hang.
    sock.settimeout(20)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    sock.close()
    assert b"data: [DONE]" not in received and b"chat.completion.chunk" in received
    assert "STREAM_SEND_TIMEOUT" in srv.log_tail(200)
    print(f"aborted {aborted_after:.1f} s after the request, {len(received)} bytes reached the client")


def test_trickled_body_is_answered_408_and_the_connection_closed(srv):
    before = metric(srv.url, "glm_serve_requests_total", route="other", status="408")
    sock = socket.socket()
    sock.settimeout(30)
    sock.connect(("127.0.0.1", srv.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 200\r\n\r\n")
    started = time.monotonic()
    sock.setblocking(False)
    # A byte every 0.3 s (the body would take a minute) until the server answers.
    data = b""
    while time.monotonic() - started < 15 and not data:
        try:
            sock.send(b" ")
        except OSError:
            break
        time.sleep(0.3)
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            pass
    sock.setblocking(True)
    elapsed = time.monotonic() - started
    assert data, "no answer to a trickled body within 15 s"
    status, headers, body = read_response(_Replay(data, sock))
    assert status == 408 and headers.get("connection") == "close", (status, headers)
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert LIMIT - 0.5 < elapsed < LIMIT + 5, elapsed
    closed_within(sock, 10)
    assert metric(srv.url, "glm_serve_requests_total", route="other", status="408") == before + 1


def test_trickled_or_missing_headers_close_the_connection(srv):
    silent = socket.create_connection(("127.0.0.1", srv.port))  # opens and sends nothing
    trickler = socket.create_connection(("127.0.0.1", srv.port))
    trickler.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
    started = time.monotonic()
    trickler.settimeout(0.3)
    closed = None
    for byte in b"X-Slow: " + b"a" * 100:  # a header byte every 0.3 s: the headers would take 30 s
        try:
            trickler.sendall(bytes([byte]))
            if trickler.recv(65536) == b"":
                closed = time.monotonic() - started
                break
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            closed = time.monotonic() - started
            break
    assert closed is not None, "the server waited over 30 s for one request's headers"
    assert LIMIT - 0.5 < closed < LIMIT + 3, closed
    assert closed_within(silent, 5) >= 0  # the silent one went at the same time
    assert "HEADER_READ_TIMEOUT" in srv.log_tail(50)
    # Complete requests are unaffected.
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200


def test_idle_keep_alive_connection_is_closed_and_reuse_within_it_works(srv):
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.settimeout(10)
    for _ in range(3):  # reused within KEEP_ALIVE_TIMEOUT: the same connection answers each time
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _body = read_response(sock)
        assert status == 200 and headers.get("connection") != "close"
        time.sleep(0.3)
    idle = closed_within(sock, 10)
    assert 0.3 < idle < 3, f"closed after {idle:.2f} s idle with KEEP_ALIVE_TIMEOUT=1"


class _Replay:
    """A socket whose first recv returns bytes already read."""

    def __init__(self, first: bytes, sock: socket.socket):
        self.first, self.sock = first, sock

    def recv(self, n: int) -> bytes:
        if self.first:
            out, self.first = self.first, b""
            return out
        return self.sock.recv(n)


def test_send_timeout_aborts_a_blocked_write_in_process():
    """The middleware alone, with an ASGI `send` that blocks like uvicorn's while a client does not read: the
    request ends after STREAM_SEND_TIMEOUT, the app's cleanup runs (what frees the engine slot), and it is counted."""
    import asyncio

    from server.api.middleware import RequestContextMiddleware
    from server.metrics import Metrics

    cleaned = []

    async def app(scope, receive, send):
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(1000):
                await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        finally:
            cleaned.append(True)

    async def send(message):
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # the socket's buffers are full and stay full

    async def receive():
        await asyncio.Event().wait()

    metrics = Metrics()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    started = time.monotonic()
    asyncio.run(RequestContextMiddleware(app, metrics, send_timeout=0.5)(scope, receive, send))
    assert 0.4 < time.monotonic() - started < 3
    assert cleaned == [True]
    assert metrics.slow_client_aborts._value.get() == 1
    assert metrics.requests.labels("other", "200")._value.get() == 1
