"""What a soak saw, and its verdict: each request's outcome, resident memory over the run (warm-up and plateau),
and whether /metrics counted exactly the answers the clients got. bench/soak.py sends the traffic."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Outcome:
    kind: str
    status: int | None  # None: no HTTP answer (a hang or a transport error)
    seconds: float
    problem: str | None = None
    at: float = 0.0  # when it was sent, seconds since the soak began: a transport error's context
    error_event: bool = False  # a stream that ended with an in-band OpenAI error (engine_down_ok only)

    @property
    def ended(self) -> float:
        return self.at + self.seconds


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)  # the measured requests
    warmup_outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    rss_start_kib: int | None = None  # before the warm-up
    warmup_rss_kib: list[int] = field(default_factory=list)  # after each warm-up round
    warmup_hwm_kib: list[int] = field(default_factory=list)  # the high-water mark after each warm-up round
    rss_before_kib: int | None = None  # after the warm-up: the plateau's start
    rss_after_kib: int | None = None
    rss_samples: list[tuple[int, int]] = field(default_factory=list)  # (measured requests done, KiB)
    # (route, status) -> [answers the clients saw, requests the server's /metrics counted], where they differ
    metrics_mismatch: dict[str, list[int]] | None = None
    hook_times: dict[int, float] = field(default_factory=dict)  # n -> when hooks[n] ran (seconds since the start)

    @property
    def violations(self) -> list[Outcome]:
        return [o for o in self.warmup_outcomes + self.outcomes if o.problem]

    def slope_kib_per_request(self) -> float | None:
        """Least-squares slope of resident memory over the measured requests (noise-robust, unlike two points)."""
        pts = self.rss_samples
        if len(pts) < 2:
            return None
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        var = sum((x - mx) ** 2 for x, _ in pts)
        return sum((x - mx) * (y - my) for x, y in pts) / var if var else None

    def floor_growth_percent(self) -> float | None:
        """Growth of the lowest reading from the first third of the measured requests to the last third. Resident
        memory swings with work in flight (in-process embedding batches: ~720-1160 MiB on a ~700 MiB glm-serve in
        front of vLLM) and falls back between; a single last reading lands anywhere in a swing, the floor does not,
        and a leak raises it."""
        pts = [kib for _, kib in self.rss_samples]
        if len(pts) < 3:
            return None
        third = max(1, len(pts) // 3)
        return _percent(min(pts[:third]), min(pts[-third:]))

    def summary(self) -> dict:
        statuses = Counter(f"{o.kind} {o.status}" for o in self.outcomes)
        growth = _percent(self.rss_before_kib, self.rss_after_kib)
        slope = self.slope_kib_per_request()
        return {
            "requests": len(self.outcomes),
            "seconds": round(self.seconds, 1),
            "requests_per_second": round(len(self.outcomes) / self.seconds, 1) if self.seconds else None,
            "status_by_kind": dict(sorted(statuses.items())),
            "rate_limited_429": sum(o.status == 429 for o in self.outcomes),
            "unavailable_503": sum(o.status == 503 for o in self.outcomes),
            "stream_error_events": sum(o.error_event for o in self.outcomes),
            "server_errors_5xx": sum((o.status or 0) >= 500 for o in self.outcomes),
            "hung": sum(o.problem == "hung" for o in self.outcomes),
            "slowest_seconds": round(max((o.seconds for o in self.outcomes), default=0), 2),
            "warmup": {
                "requests": len(self.warmup_outcomes),
                "rounds": len(self.warmup_rss_kib),
                "rss_start_mib": _mib(self.rss_start_kib),
                "rss_after_each_round_mib": [_mib(k) for k in self.warmup_rss_kib],
                "high_water_after_each_round_mib": [_mib(k) for k in self.warmup_hwm_kib],
                "growth_percent": _percent(self.rss_start_kib, self.rss_before_kib),
            },
            "rss_before_mib": _mib(self.rss_before_kib),
            "rss_after_mib": _mib(self.rss_after_kib),
            "rss_growth_percent": growth,  # the plateau: from after the warm-up to the end
            "rss_floor_growth_percent": self.floor_growth_percent(),  # the verdict: lowest, 1st vs last third
            "rss_slope_mib_per_1000": None if slope is None else round(slope * 1000 / 1024, 2),
            "rss_slope_percent_per_1000": (None if slope is None or not self.rss_before_kib
                                           else round(100 * slope * 1000 / self.rss_before_kib, 2)),
            "metrics_mismatch": self.metrics_mismatch,
            "violations": len(self.violations),
            "violation_kinds": dict(Counter(f"{o.kind} {o.status}: {o.problem[:160]}" for o in self.violations)),
            "violation_examples": [{"kind": o.kind, "sent_at_s": round(o.at, 2), "took_s": round(o.seconds, 3),
                                    "problem": o.problem[:160]} for o in self.violations[:5]],
        }


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _percent(before: int | None, after: int | None) -> float | None:
    return round(100 * (after - before) / before, 2) if before and after else None


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory now (VmRSS), or its high-water mark so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


ROUTES = {"embed": "/v1/embeddings"}  # every other kind posts to /v1/chat/completions
# The routes the soak's requests can be counted under ("other": a request no route matched).
_SOAK_ROUTES = {"/v1/embeddings", "/v1/chat/completions", "other"}


async def request_counts(client: httpx.AsyncClient) -> Counter:
    """The server's glm_serve_requests counter: (route, status) -> requests."""
    from prometheus_client.parser import text_string_to_metric_families

    r = await client.get("/metrics")
    r.raise_for_status()
    counts: Counter = Counter()
    for family in text_string_to_metric_families(r.text):
        if family.name == "glm_serve_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    counts[(s.labels["route"], s.labels["status"])] = int(s.value)
    return counts


async def _reconcile(client: httpx.AsyncClient, before: Counter, outcomes: list[Outcome],
                     wait: float = 10.0) -> dict[str, list[int]] | None:
    """None when the server counted exactly the answers the clients saw (route and status), else the difference.

    A dropped stream is counted when the server notices and finishes it, so the comparison is retried briefly.
    Requests that got no answer (a transport error: already a violation) are counted as status "none"."""
    seen = Counter((ROUTES.get(o.kind, "/v1/chat/completions"), str(o.status).lower()) for o in outcomes)
    give_up = time.monotonic() + wait
    while True:
        now = await request_counts(client)
        counted = Counter({k: now[k] - before[k] for k in now if k[0] in _SOAK_ROUTES and now[k] > before[k]})
        if counted == seen or time.monotonic() > give_up:
            break
        await asyncio.sleep(0.25)
    diff = {f"{route} {status}": [seen[(route, status)], counted[(route, status)]]
            for route, status in sorted(set(seen) | set(counted)) if seen[(route, status)] != counted[(route, status)]}
    return diff or None
