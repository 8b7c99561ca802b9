"""A dying engine under load: SIGKILL the engine's child (vLLM, llama-server) in the middle of a short soak
(bench/soak.py's hooks), the same test on each supervised engine.

Every request in flight at the kill ends within 5 s (an error event on a stream, a 503 OpenAI error otherwise),
none hangs; requests sent while the engine restarts get 503 with Retry-After; /health says why; once it is back a
second soak runs clean; and /metrics counted every request of both by the status its client saw. (The restart's
backoff and its bound are tests/test_vllm_units.py and tests/test_vllm_backend.py; an engine that cannot start at
all is tests/test_engine_startup.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.soak import SoakConfig, run_soak
from tests.conftest import DEFAULT_ENV, engine_env
from tests.support import ARTIFACTS, running_server

KILL_AT, REQUESTS, AFTER = 80, 240, 80
CONCURRENCY = 16  # enough that several engine requests are in flight at the kill beside slow embeddings
ENGINE_KINDS = {"chat", "stream", "drop"}  # the kinds that reach the engine (embeddings are in-process)


@dataclass
class Engine:
    marker: bytes  # in the child's command line
    # Seconds after the kill that are surely inside the outage: vLLM takes 50 s and more to come back here;
    # llama-server ~1 s after the supervisor's first 1 s backoff, which it is sure to be waiting out by 0.3 s.
    down: tuple[float, float]
    start_timeout: float


ENGINES = {"vllm": Engine(b"vllm", (2, 20), 900), "llamacpp": Engine(b"llama-server", (0.3, 1.0), 300)}


def engine_child(server_pid: int, marker: bytes) -> int:
    """The engine process glm-serve started (its child whose command line names the engine)."""
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if marker in cmdline:
                return int(pid)
    raise AssertionError(f"glm-serve (pid {server_pid}) has no {marker.decode()} child")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_killed_during_a_soak_fails_fast_then_recovers(engine):
    spec = ENGINES[engine]
    env = {**DEFAULT_ENV, **engine_env(engine), "LOG_LEVEL": "info"}
    with running_server(env, name=f"{engine}-kill-soak", timeout=spec.start_timeout) as srv:
        child = engine_child(srv.proc.pid, spec.marker)
        # timeout 120 s: embeddings run in-process and share the 2 cores with the engine's restart
        outage: dict[str, httpx.Response] = {}

        def kill() -> None:
            os.kill(child, signal.SIGKILL)

            def look() -> None:  # /health inside the outage (llama-server is back ~2 s later)
                time.sleep(spec.down[0])
                outage["health"] = httpx.get(srv.url + "/health", timeout=10)

            threading.Thread(target=look, daemon=True).start()

        cfg = SoakConfig(url=srv.url, requests=REQUESTS, concurrency=CONCURRENCY, timeout=120, warmup=24,
                         warmup_rounds=1, hooks={KILL_AT: kill}, engine_down_ok=True)
        report = asyncio.run(run_soak(cfg))
        health = outage["health"]
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
    later = [o for o in report.outcomes if killed + spec.down[0] < o.at < killed + spec.down[1]
             and o.kind in ENGINE_KINDS]
    measured = {"in_flight_at_kill": len(in_flight),
                "slowest_in_flight_end_s": round(max((o.ended - killed for o in in_flight), default=0), 2),
                "back_after_the_soak_s": round(back_after, 1), "first": summary, "after": after}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"{engine}_kill_soak.json").write_text(json.dumps(measured, indent=2) + "\n")
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
