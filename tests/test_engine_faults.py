"""A dying engine under load: SIGKILL the vLLM child in the middle of a short soak (bench/soak.py's hooks).

Every request in flight at the kill ends within 5 s (an error event on a stream, a 503 OpenAI error otherwise),
none hangs; requests sent while vLLM restarts get 503 with Retry-After; /health says why; once it is back a
second soak runs clean; and /metrics counted every request of both by the status its client saw. (The restart's
backoff and its bound are tests/test_vllm_units.py and tests/test_vllm_backend.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from bench.soak import SoakConfig, run_soak
from tests.conftest import DEFAULT_ENV, vllm_env
from tests.support import ARTIFACTS, running_server

KILL_AT, REQUESTS, AFTER = 80, 240, 80
CONCURRENCY = 16  # enough that several engine requests are in flight at the kill beside slow embeddings
ENGINE_KINDS = {"chat", "stream", "drop"}  # the kinds that reach the engine (embeddings are in-process)


def vllm_child(server_pid: int) -> int:
    """The vLLM process glm-serve started (its child whose command line runs vLLM)."""
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"vllm" in cmdline:
                return int(pid)
    raise AssertionError(f"glm-serve (pid {server_pid}) has no vLLM child")


@pytest.mark.slow
def test_vllm_killed_during_a_soak_fails_fast_then_recovers():
    env = {**DEFAULT_ENV, **vllm_env(), "LOG_LEVEL": "info"}
    with running_server(env, name="vllm-kill-soak", timeout=900) as srv:
        child = vllm_child(srv.proc.pid)
        # timeout 120 s: embeddings run in-process and share the 2 cores with vLLM's restart
        cfg = SoakConfig(url=srv.url, requests=REQUESTS, concurrency=CONCURRENCY, timeout=120, warmup=24,
                         warmup_rounds=1, hooks={KILL_AT: lambda: os.kill(child, signal.SIGKILL)},
                         engine_down_ok=True)
        report = asyncio.run(run_soak(cfg))
        health = httpx.get(srv.url + "/health", timeout=10)
        down_at = time.monotonic()
        while time.monotonic() - down_at < 600 and httpx.get(srv.url + "/health", timeout=10).status_code != 200:
            time.sleep(1)
        back_after = time.monotonic() - down_at
        again = asyncio.run(run_soak(SoakConfig(url=srv.url, requests=AFTER, concurrency=CONCURRENCY, timeout=120,
                                                warmup=0, warmup_rounds=0)))
        log = srv.log_tail(60)
    summary, after = report.summary(), again.summary()
    killed = report.hook_times[KILL_AT]
    in_flight = [o for o in report.outcomes if o.at <= killed < o.ended and o.kind in ENGINE_KINDS]
    # Sent while vLLM restarts (it takes 50 s and more to come back here: the first 20 s are surely inside).
    later = [o for o in report.outcomes if killed + 2 < o.at < killed + 20 and o.kind in ENGINE_KINDS]
    measured = {"in_flight_at_kill": len(in_flight),
                "slowest_in_flight_end_s": round(max((o.ended - killed for o in in_flight), default=0), 2),
                "health_503_then_back_after_s": round(back_after, 1), "first": summary, "after": after}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "vllm_kill_soak.json").write_text(json.dumps(measured, indent=2) + "\n")
    print(json.dumps({k: v for k, v in measured.items() if k not in ("first", "after")}))

    assert summary["violations"] == 0 and summary["hung"] == 0, f"{summary}\n{log}"
    assert summary["metrics_mismatch"] is None and after["metrics_mismatch"] is None, (summary, after)
    assert in_flight, "nothing was in flight at the kill"
    assert all(o.ended - killed <= 5 for o in in_flight), measured
    assert any(o.error_event or o.status == 503 for o in in_flight), "the kill failed no request in flight"
    assert later and all(o.status == 503 for o in later), [(o.kind, o.status) for o in later]
    assert health.status_code == 503 and health.headers.get("retry-after", "").isdigit()
    assert "SIGKILL" in health.json()["error"]["message"], health.text
    assert after["requests"] == AFTER and after["violations"] == 0, after
    assert after["status_by_kind"].get("chat 200", 0) + after["status_by_kind"].get("stream 200", 0) > 0, after
