"""bench/serve.py's request timing against an in-memory transport (no server, no network)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` is not an installed package

from bench.serve import build_parser, make_body, prompts_per_level, stream_request  # noqa: E402


def _sse(*events: dict | str) -> bytes:
    lines = [": ping\r\n\r\n"]
    for ev in events:
        lines.append(f"data: {ev if isinstance(ev, str) else json.dumps(ev)}\r\n\r\n")
    return "".join(lines).encode()


def _delta(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def _run(handler, timeout: float | None = 5.0):
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await stream_request(client, "http://x/v1/chat/completions", {}, {"stream": True}, timeout)

    return asyncio.run(go())


def test_stream_with_usage():
    body = _sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        _delta("Hel"),
        _delta("lo"),
        _delta("!"),
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}},
        "[DONE]",
    )
    res = _run(lambda request: httpx.Response(200, content=body))
    assert res.success and res.status == 200
    assert res.chunks == 3 and len(res.itl) == 2
    assert res.output_tokens == 4 and res.prompt_tokens == 7 and res.usage_reported
    assert 0 <= res.ttft <= res.e2e


def test_stream_without_usage_counts_chunks():
    res = _run(lambda request: httpx.Response(200, content=_sse(_delta("a"), _delta("b"), "[DONE]")))
    assert res.success and res.output_tokens == 2 and not res.usage_reported


def test_line_separators_inside_a_chunk_stay_in_it():
    # raw, as orjson writes them: str.splitlines (and httpx's aiter_lines) would cut these events in two
    body = "".join(f'data: {{"choices": [{{"index": 0, "delta": {{"content": "{c}"}}}}]}}\n\n'
                   for c in ("a\u2028", "\u2029", "\x85b")).encode() + b"data: [DONE]\n\n"
    res = _run(lambda request: httpx.Response(200, content=body))
    assert res.success and res.chunks == 3, res.error


def test_failures():
    res = _run(lambda request: httpx.Response(429, json={"error": {"message": "busy"}}))
    assert not res.success and res.status == 429 and "busy" in res.error
    res = _run(lambda request: httpx.Response(200, content=_sse({"error": {"message": "boom"}})))
    assert not res.success and res.error == "boom"
    res = _run(lambda request: httpx.Response(200, content=_sse("[DONE]")))
    assert not res.success and "without generated text" in res.error
    res = _run(lambda request: httpx.Response(200, content=b"data: {oops\n\n"))
    assert not res.success and "bad SSE" in res.error

    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    res = _run(refuse)
    assert not res.success and res.status is None and "ConnectError" in res.error


def test_whole_request_timeout():
    async def slow(request):
        await asyncio.sleep(5)
        return httpx.Response(200, content=_sse(_delta("late"), "[DONE]"))

    res = _run(slow, timeout=0.2)
    assert not res.success and "timed out" in res.error


def test_body_and_levels():
    args = build_parser().parse_args(["--output-len", "32"])
    body = make_body(args, "m", "hi", {"ignore_eos": True})
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["max_tokens"] == 32
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0.0
    assert body["model"] == "m" and body["ignore_eos"] is True
    assert "model" not in make_body(args, None, "hi", {})
    legacy = make_body(build_parser().parse_args(["--endpoint", "/completions"]), "m", "hi", {})
    assert legacy["prompt"] == "hi" and "messages" not in legacy
    assert prompts_per_level(None, [1, 16]) == [16, 64]
    assert prompts_per_level("8", [1, 16]) == [8, 8]
    assert prompts_per_level("4,32", [1, 16]) == [4, 32]
    with pytest.raises(SystemExit):
        prompts_per_level("1,2,3", [1, 16])
