"""Load and faults: 1000 mixed requests at concurrency 32 against a server with a short queue (bench/soak.py), on
the native engine and on vLLM (--enforce-eager).

No hangs, no 5xx, every refusal an OpenAI error (429s with Retry-After, and they must really happen), the server's
/metrics count every request once by the status its client saw, and resident memory, measured from a warm plateau
(warm-up rounds until a round raises neither it nor its high-water mark by 1%), has a floor that grows by under 5%
over the 1000 requests (the lowest reading of the last third against that of the first). On vLLM that is
glm-serve's own memory (the proxy, its streams, in-process embeddings), not vLLM's child.
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest

from bench.soak import SoakConfig, require_loopback, run_soak
from tests.conftest import engine_env
from tests.support import ARTIFACTS, running_server

REQUESTS = int(os.environ.get("SOAK_REQUESTS", "1000"))
# Warm-up rounds until one raises resident memory and its high-water mark by under 1%; at most 600 requests.
WARMUP_ROUND, WARMUP_ROUNDS = 150, 4
# A short queue and a small batch, so that 32 clients really overflow it; a small context so that the
# over-long prompts are refused cheaply.
SOAK_ENV = {"DTYPE": "float32", "MAX_RUNNING_REQUESTS": "8", "MAX_WAITING_REQUESTS": "4", "MAX_MODEL_LEN": "512",
            "LOG_LEVEL": "warning"}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~3-4 min on a quiet machine (+1-2 min to start vLLM); a busy one takes longer
@pytest.mark.parametrize("engine", ["native", "vllm"])
def test_soak_mixed_traffic_with_drops_and_junk(engine):
    with running_server({**SOAK_ENV, **engine_env(engine)}, name=f"soak-{engine}", timeout=900) as srv:
        report = asyncio.run(run_soak(SoakConfig(url=srv.url, requests=REQUESTS, concurrency=32, timeout=120,
                                                 max_seconds=900, pid=srv.proc.pid, warmup=WARMUP_ROUND,
                                                 warmup_rounds=WARMUP_ROUNDS, sample_every=50)))
        log = srv.log_tail(30)
    summary = report.summary()
    ARTIFACTS.mkdir(exist_ok=True)
    name = "soak.json" if engine == "native" else f"soak-{engine}.json"
    (ARTIFACTS / name).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    assert summary["requests"] == REQUESTS, summary  # nothing skipped by the time bound
    assert summary["violations"] == 0, f"{summary}\n{log}"
    assert summary["hung"] == 0 and summary["server_errors_5xx"] == 0
    assert summary["rate_limited_429"] > 0, "the queue never overflowed: the test did not test backpressure"
    assert summary["metrics_mismatch"] is None, f"/metrics and the clients disagree: {summary['metrics_mismatch']}"
    # Was 20-45% (issue #5): not a leak but glibc keeping the memory freed by CPU embedding batches; malloc_trim
    # after each batch (server/embeddings.py) gives it back. From a fresh server the first ~1000 requests still
    # raise the high-water mark by ~10% (issue #17), so the verdict is taken from the plateau after the warm-up,
    # and from its floor (the lowest readings of the first and last thirds): on vLLM glm-serve's own ~700 MiB swing
    # by ~60% with embedding batches in flight, and a last reading landed at +5.7% in one run, -2.8% in the next.
    print(f"warm-up: {summary['warmup']}; plateau: floor {summary['rss_floor_growth_percent']}%, last reading "
          f"{summary['rss_growth_percent']}% over {REQUESTS} requests, slope {summary['rss_slope_percent_per_1000']}%"
          " per 1000")
    assert summary["rss_floor_growth_percent"] < 5, summary


def test_soak_refuses_other_hosts():
    require_loopback("http://127.0.0.1:6006")
    require_loopback("http://[::1]:6006")
    require_loopback("http://localhost:6006")
    for url in ("http://10.0.0.1:6006", "http://example.com", "http://127.0.0.1.nip.io:6006"):
        with pytest.raises(SystemExit):
            require_loopback(url)


def test_soak_floor_ignores_swings_and_sees_a_leak():
    from bench.soak_report import Report

    swings = Report(rss_samples=[(i * 50, kib) for i, kib in enumerate([720, 1100, 725, 980, 1160, 722, 1000, 723,
                                                                         1150])])
    assert abs(swings.floor_growth_percent()) < 1  # the last reading alone would say +60%
    leak = Report(rss_samples=[(i * 50, 700 + 30 * i) for i in range(9)])
    assert leak.floor_growth_percent() > 20


def test_warm_up_ends_when_reading_and_high_water_mark_both_level_off():
    from bench.soak import plateaued

    assert not plateaued([700], [900], 1.0)  # one round says nothing yet
    assert plateaued([700, 705], [900, 905], 1.0)
    assert not plateaued([720, 712], [900, 1000], 1.0)  # a low reading while the working set still grows
    assert not plateaued([700, 760], [1000, 1000], 1.0)


def test_soak_reconciliation_names_what_the_server_did_not_count():
    """The /metrics check can fail: a request a client saw answered but the server never counted is reported."""
    from bench.soak_report import Outcome, _reconcile, request_counts

    head = "# HELP glm_serve_requests_total HTTP requests\n# TYPE glm_serve_requests_total counter\n"
    texts = iter([
        head + 'glm_serve_requests_total{route="/v1/chat/completions",status="200"} 5.0\n',
        head + 'glm_serve_requests_total{route="/v1/chat/completions",status="200"} 6.0\n'
        'glm_serve_requests_total{route="/v1/embeddings",status="200"} 1.0\n',
    ])
    last = {}

    def answer(request):
        last["text"] = next(texts, last.get("text"))
        return httpx.Response(200, text=last["text"])

    async def check():
        async with httpx.AsyncClient(base_url="http://127.0.0.1", transport=httpx.MockTransport(answer)) as client:
            before = await request_counts(client)
            seen = [Outcome("chat", 200, 0.1), Outcome("stream", 200, 0.1), Outcome("embed", 200, 0.1)]
            return await _reconcile(client, before, seen, wait=0.3)

    assert asyncio.run(check()) == {"/v1/chat/completions 200": [2, 1]}
