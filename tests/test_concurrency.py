"""Many requests at once: every one answered, bounded queues (429), cancellation frees slots, coalesced embeddings.

Correctness only: timings belong to bench/, never to tests.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from tests.conftest import ENGINES, engine_env
from tests.support import running_server

LONG = [{"role": "user", "content": "Write a very long story about a dragon who learns to cook."}]


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module", params=ENGINES)
def small_server(request):
    """The smallest capacity (2 running, 2 waiting) on each engine: backpressure and cancellation live above the
    seam, so they must hold on vLLM too (vLLM's own running count is checked in tests/test_vllm_backend.py)."""
    env = {"DTYPE": "float32", "MAX_RUNNING_REQUESTS": "2", "MAX_WAITING_REQUESTS": "2", "WEB_UI": "false"}
    if request.param != "native":
        env = {**env, **engine_env(request.param), "EMBEDDING_PATH": "none"}
    with running_server(env, name=f"limits-{request.param}", timeout=900) as srv:
        srv.engine = request.param
        yield srv


def test_past_the_limits_requests_get_429_with_retry_after(small_server):
    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"messages": LONG, "max_tokens": 24, "temperature": 0}
            return await asyncio.gather(*(client.post(small_server.base_url + "/chat/completions", json=body)
                                          for _ in range(10)))

    responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes
    assert codes.count(200) >= 4  # 2 running + 2 waiting were accepted
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_streaming_overload_is_a_429_before_any_byte(small_server):
    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"messages": LONG, "max_tokens": 16, "stream": True}
            return await asyncio.gather(*(client.post(small_server.base_url + "/chat/completions", json=body)
                                          for _ in range(8)))

    codes = [r.status_code for r in asyncio.run(run())]
    assert 429 in codes and 200 in codes


@pytest.mark.timeout(1200)
def test_many_aborted_streams_leave_no_slot_or_cache_behind(small_server):
    url = small_server.base_url + "/chat/completions"
    body = {"messages": LONG, "max_tokens": 400, "stream": True}

    async def abort_one(client, at_first_token: bool) -> None:
        for _ in range(600):  # a leaked slot would keep this at 429 until the bound runs out
            async with client.stream("POST", url, json=body) as r:
                if r.status_code == 429:
                    await asyncio.sleep(0.05)
                    continue
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not at_first_token or (line.startswith("data: ") and '"role"' not in line):
                        return  # the client goes away after the role chunk (maybe still queued) or a token
                return
        raise AssertionError("no slot became free")

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            for _ in range(30):
                await asyncio.gather(*(abort_one(client, i % 2 == 0) for i in range(4)))

    asyncio.run(run())
    for _ in range(300):  # the last ones are freed within a decode step or two
        if metric(small_server.url, "glm_serve_running_requests") == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert metric(small_server.url, "glm_serve_running_requests") == 0
    assert metric(small_server.url, "glm_serve_waiting_requests") == 0
    if small_server.engine == "native":  # vLLM and llama.cpp keep their preallocated pools; their counts are 0 above
        assert metric(small_server.url, "glm_serve_kv_cache_bytes") == 0
    assert metric(small_server.url, 'glm_serve_finished_sequences_total{reason="abort"}') >= 110
    r = httpx.post(url, json={"messages": LONG, "max_tokens": 4}, timeout=120)
    assert r.status_code == 200  # and the server still answers normally


def test_dropped_non_streaming_request_is_cancelled(small_server):
    before = metric(small_server.url, 'glm_serve_finished_sequences_total{reason="abort"}')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small_server.base_url + "/chat/completions", json={"messages": LONG, "max_tokens": 400},
                   timeout=1.0)
    for _ in range(100):
        if metric(small_server.url, 'glm_serve_finished_sequences_total{reason="abort"}') > before:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert metric(small_server.url, 'glm_serve_finished_sequences_total{reason="abort"}') == before + 1


def test_mixed_sampling_in_one_batch_each_keeps_its_own_parameters(server):
    """Greedy, seeded sampling, stop strings and max_tokens side by side: each equals its solo answer."""
    url = server.base_url + "/chat/completions"
    variants = [
        {"temperature": 0, "max_tokens": 12},
        {"temperature": 0.9, "seed": 11, "max_tokens": 10},
        {"temperature": 0, "max_tokens": 30, "stop": ["."]},
        {"temperature": 0.7, "top_p": 0.8, "seed": 3, "max_tokens": 3},
    ]
    msgs = [{"role": "user", "content": "Describe the sea in two sentences."}]

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            async def ask(v):
                r = await client.post(url, json={"messages": msgs, **v})
                return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["completion_tokens"]

            alone = [await ask(v) for v in variants]
            together = await asyncio.gather(*(ask(v) for v in variants * 2))
            return alone, together

    alone, together = asyncio.run(run())
    assert together == alone * 2
    assert alone[3][1] == 3 and "." not in alone[2][0]


def test_concurrent_embeddings_are_coalesced(server):
    before_batches = metric(server.url, "glm_serve_embedding_batches_total")
    before_texts = metric(server.url, "glm_serve_embedding_texts_total")

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            rs = await asyncio.gather(*(client.post(server.base_url + "/embeddings", json={"input": f"text {i}"})
                                        for i in range(32)))
            return [r.json()["data"][0]["embedding"] for r in rs]

    vectors = asyncio.run(run())
    assert len(vectors) == 32 and all(len(v) == 384 for v in vectors)
    batches = metric(server.url, "glm_serve_embedding_batches_total") - before_batches
    assert metric(server.url, "glm_serve_embedding_texts_total") - before_texts == 32
    assert batches < 32  # requests that arrived while the encoder was busy shared a forward pass


def test_metrics_exposes_prometheus_series(server):
    httpx.post(server.base_url + "/chat/completions", json={"messages": LONG, "max_tokens": 2}, timeout=120)
    text = httpx.get(server.url + "/metrics").text
    for name in ("glm_serve_requests_total", "glm_serve_running_requests", "glm_serve_waiting_requests",
                 "glm_serve_time_to_first_token_seconds_bucket", "glm_serve_inter_token_latency_seconds_bucket",
                 "glm_serve_prompt_tokens_total", "glm_serve_generation_tokens_total", "glm_serve_kv_cache_bytes",
                 "glm_serve_process_resident_bytes"):
        assert name in text, name
