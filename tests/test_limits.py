"""Request bounds (413/400 in the OpenAI error shape), request ids, and what the log must never hold."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest
from starlette.testclient import TestClient

from server.api.limits import request_id
from server.api.protocol import MAX_MESSAGES, MAX_TOOLS
from tests.hardened import AUTH, KEY, stub_app

pytest_plugins = ["tests.hardened_server"]

MSG = {"role": "user", "content": "Hi"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def assert_openai_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


# ---- body size, in process ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    with TestClient(stub_app(max_request_bytes=2048)) as c:
        yield c


def test_declared_content_length_over_the_limit_is_413(small):
    r = small.post("/v1/chat/completions", content=b"x" * 2049, headers={"Content-Type": "application/json"})
    err = assert_openai_error(r, 413, code="request_too_large")
    assert "2048" in err["message"] and "MAX_REQUEST_BYTES" in err["message"]


def test_streamed_body_over_the_limit_is_413_without_content_length(small):
    def chunks():  # a generator body is sent chunked: no Content-Length to check up front
        for _ in range(10):
            yield b"x" * 300

    r = small.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_openai_error(r, 413, code="request_too_large")


def test_body_under_the_limit_reaches_the_route(small):
    r = small.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, code="invalid_json")  # parsed (and refused) by the route, not the limit

    def chunks():
        yield b'{"messages": '
        yield b"[]}"

    r = small.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, param="messages")


# ---- request shape bounds (pydantic, before the engine) -----------------------------------------------------


@pytest.fixture(scope="module")
def client():
    with TestClient(stub_app()) as c:
        yield c


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"messages": [MSG] * (MAX_MESSAGES + 1)}, "messages"),
        ({"tools": [TOOL] * (MAX_TOOLS + 1)}, "tools"),
        ({"functions": [TOOL["function"]] * (MAX_TOOLS + 1)}, "functions"),
        ({"n": 17}, "n"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"stop": "s" * 513}, "stop"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"repetition_penalty": 0.001}, "repetition_penalty"),  # logits / 5e-324 overflowed the sampler
        ({"tool_choice": {"type": "function", "function": {"name": ["f"]}}, "tools": [TOOL]}, "tool_choice"),
        ({"functions": [TOOL["function"]], "function_call": {"arguments": "{}"}}, "function_call"),
    ],
    ids=lambda v: v if isinstance(v, str) else next(iter(v)),
)
def test_chat_bounds_are_400(client, extra, param):
    r = client.post("/v1/chat/completions", json={"messages": [MSG], **extra})
    err = assert_openai_error(r, 400)
    assert (err["param"] or "").startswith(param), err


def test_request_id_is_sanitized():
    assert request_id("trace-123_A.b") == "trace-123_A.b"
    assert request_id("x" * 64) == "x" * 64
    for bad in (None, "", "x" * 65, "a b", "id\x1b[31m", "../../etc", "ид", "a,b", "a\tb"):
        rid = request_id(bad)
        if bad == "../../etc":  # only [A-Za-z0-9._-]: dots and dashes are fine, slashes are not
            assert rid != bad
        assert re.fullmatch(r"req-[0-9a-f]{12}", rid), (bad, rid)


def test_request_id_header_round_trip(client):
    assert client.get("/v1/models", headers={"X-Request-ID": "trace-123"}).headers["x-request-id"] == "trace-123"
    odd = "evil value\u00ff".encode("latin-1")  # a space and a non-ASCII byte
    generated = client.get("/v1/models", headers={"X-Request-ID": odd}).headers["x-request-id"]
    assert re.fullmatch(r"req-[0-9a-f]{12}", generated)
    assert re.fullmatch(r"req-[0-9a-f]{12}", client.get("/v1/models").headers["x-request-id"])


# ---- over the wire, on the real server ----------------------------------------------------------------------


def post(server, path, **kw):
    headers = {**AUTH, **kw.pop("headers", {})}
    return httpx.post(server.base_url + path, headers=headers, timeout=120, **kw)


def test_real_server_413_declared_and_chunked(hardened_server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]})
    assert_openai_error(post(hardened_server, "/chat/completions", content=big,
                             headers={"Content-Type": "application/json"}), 413, code="request_too_large")

    def chunks():
        for _ in range(8):
            yield b" " * 10_000

    r = post(hardened_server, "/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")
    # The server is fine afterwards.
    assert httpx.get(hardened_server.url + "/health").status_code == 200


def test_real_server_embedding_input_token_limit(hardened_server):
    # EMBEDDING_MAX_INPUT_TOKENS=256 on this server; each "word" is one token of the MiniLM tokenizer.
    ok = post(hardened_server, "/embeddings", json={"input": ["word " * 200]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] <= 256  # the model window (256 for MiniLM) truncates, as documented
    r = post(hardened_server, "/embeddings", json={"input": ["short", "word " * 300]})
    err = assert_openai_error(r, 400, param="input", code="context_length_exceeded")
    assert "input[1]" in err["message"] and "EMBEDDING_MAX_INPUT_TOKENS" in err["message"]
    assert_openai_error(post(hardened_server, "/embeddings", json={"input": ["a"] * 2049}), 400, param="input")


def test_real_server_max_tokens_against_the_context(hardened_server):
    r = post(hardened_server, "/chat/completions", json={"messages": [MSG], "max_tokens": 600})
    assert_openai_error(r, 400, param="messages", code="context_length_exceeded")


@pytest.mark.parametrize("extra", [{"seed": 2**63 - 1, "n": 2, "temperature": 1}, {"temperature": 1e-40},
                                   {"repetition_penalty": 0.01, "temperature": 1}],
                         ids=["largest-seed", "tiny-temperature", "smallest-repetition-penalty"])
def test_real_server_serves_the_edges_of_the_ranges(hardened_server, extra):
    # The edges of what protocol.py accepts. Past them: a 500 (seeds over 64 bits) and, found by the fuzzer, requests
    # lost inside the engine (a tiny temperature or repetition_penalty overflowed the sampler).
    r = post(hardened_server, "/chat/completions", json={"messages": [MSG], "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text


def test_log_has_request_ids_but_no_bodies_or_keys(hardened_server):
    marker = f"PRIVATE-{uuid.uuid4().hex}"
    rid = f"trace-{uuid.uuid4().hex[:8]}"
    r = post(hardened_server, "/chat/completions", headers={"X-Request-ID": rid},
             json={"messages": [{"role": "user", "content": f"Repeat: {marker}"}], "max_tokens": 4})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    assert post(hardened_server, "/embeddings", json={"input": marker}).status_code == 200
    bad = post(hardened_server, "/chat/completions", json={"messages": [{"role": marker}]})
    assert bad.status_code == 400
    httpx.get(hardened_server.base_url + "/models", headers={"Authorization": f"Bearer {marker}"})
    log = hardened_server.log_path.read_text(errors="replace")
    assert rid in log  # requests are traceable...
    assert marker not in log and KEY not in log  # ...without their content or credentials
