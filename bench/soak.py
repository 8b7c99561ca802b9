"""A bounded soak test for a glm-serve on this machine: mixed traffic, dropped streams, junk; then a verdict.

    .venv/bin/python -m bench.soak --url http://127.0.0.1:6006 --requests 1000 --concurrency 32 --pid <server pid>

Sends a fixed number of requests (then stops; --max-seconds bounds the wall time as well): chat completions,
streamed and not, with 1-8 new tokens; embeddings; streams dropped after their first chunk; malformed JSON;
prompts longer than the context. Every request must end within --timeout and be answered 200 or with a 4xx in
the OpenAI error shape (429 with Retry-After); a 5xx, a hang or a malformed answer is a violation. With --pid it
also reports the server's resident memory after a warm-up and at the end. Exit status 1 on any violation.

Loopback only: this is a test of our own server, never a load generator for someone else's.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

# kind -> weight. Drops are a share of the streams (20%), so they are their own kind.
MIX = {"chat": 25, "stream": 24, "drop": 6, "embed": 25, "malformed": 10, "too_long": 10}
MALFORMED = [b"{", b'{"messages": [', b"not json", b'{"messages": "hi"}', b"[]", b'{"messages": [{"role": 1}]}',
             b"\xff\xfe\x00", b'{"model": null}', b'{"input": }', b""]


@dataclass
class SoakConfig:
    url: str = "http://127.0.0.1:6006"
    requests: int = 1000
    concurrency: int = 32
    timeout: float = 120.0  # per request: longer is a hang
    max_seconds: float = 900.0  # the whole run, warm-up included
    warmup: int = 64
    api_key: str | None = None
    pid: int | None = None
    seed: int = 0
    model: str | None = None
    context: int = 0  # the model's context in tokens; read from /v1/models when 0
    started: float = 0.0  # time.monotonic() when run_soak began; set by it


@dataclass
class Outcome:
    kind: str
    status: int | None  # None: no HTTP answer (a hang or a transport error)
    seconds: float
    problem: str | None = None
    at: float = 0.0  # when it was sent, seconds since the soak began: a transport error's context


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    rss_before_kib: int | None = None
    rss_after_kib: int | None = None

    @property
    def violations(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.problem]

    def summary(self) -> dict:
        statuses = Counter(f"{o.kind} {o.status}" for o in self.outcomes)
        growth = None
        if self.rss_before_kib and self.rss_after_kib:
            growth = round(100 * (self.rss_after_kib - self.rss_before_kib) / self.rss_before_kib, 2)
        return {
            "requests": len(self.outcomes),
            "seconds": round(self.seconds, 1),
            "requests_per_second": round(len(self.outcomes) / self.seconds, 1) if self.seconds else None,
            "status_by_kind": dict(sorted(statuses.items())),
            "rate_limited_429": sum(o.status == 429 for o in self.outcomes),
            "server_errors_5xx": sum((o.status or 0) >= 500 for o in self.outcomes),
            "hung": sum(o.problem == "hung" for o in self.outcomes),
            "slowest_seconds": round(max((o.seconds for o in self.outcomes), default=0), 2),
            "rss_before_mib": _mib(self.rss_before_kib),
            "rss_after_mib": _mib(self.rss_after_kib),
            "rss_growth_percent": growth,
            "violations": len(self.violations),
            "violation_kinds": dict(Counter(f"{o.kind} {o.status}: {o.problem[:160]}" for o in self.violations)),
            "violation_examples": [{"kind": o.kind, "sent_at_s": round(o.at, 2), "took_s": round(o.seconds, 3),
                                    "problem": o.problem[:160]} for o in self.violations[:5]],
        }


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"bench.soak only targets this machine (127.0.0.1, ::1, localhost), not {host!r}")


def check_error(r: httpx.Response) -> str | None:
    """None if `r` is a well-formed refusal, else what is wrong with it."""
    if r.status_code >= 500:
        return f"server error: {r.text[:200]}"
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not an OpenAI error body: {r.text[:200]}"
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"} or not err["message"]:
        return f"not an OpenAI error body: {r.text[:200]}"
    if r.status_code == 429 and not r.headers.get("retry-after", "").isdigit():
        return "429 without Retry-After"
    return None


def _chat_body(rng: random.Random, cfg: SoakConfig, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": f"Say something about the number {rng.randint(0, 10**6)}."}],
            "max_tokens": rng.randint(1, 8), "temperature": rng.choice([0, 0.7, 1.0]), **extra}
    if cfg.model:
        body["model"] = cfg.model
    return body


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random, cfg: SoakConfig) -> Outcome:
    started = time.monotonic()
    status, problem = None, None
    try:
        async with asyncio.timeout(cfg.timeout):
            status, problem = await _send(client, kind, rng, cfg)
    except TimeoutError:
        problem = "hung"
    except httpx.HTTPError as exc:
        problem = f"transport error: {type(exc).__name__}: {exc}"
    return Outcome(kind, status, time.monotonic() - started, problem, at=started - cfg.started)


async def _send(client: httpx.AsyncClient, kind: str, rng: random.Random, cfg: SoakConfig):
    if kind == "chat":
        r = await client.post("/v1/chat/completions", json=_chat_body(rng, cfg))
        if r.status_code == 200:
            return r.status_code, None if r.json()["choices"][0]["message"]["content"] is not None else "no content"
        return r.status_code, check_error(r)
    if kind == "embed":
        texts = [f"soak text {rng.random()}" * rng.randint(1, 20) for _ in range(rng.randint(1, 8))]
        r = await client.post("/v1/embeddings", json={"input": texts})
        if r.status_code == 200:
            return r.status_code, None if len(r.json()["data"]) == len(texts) else "wrong number of vectors"
        return r.status_code, check_error(r)
    if kind == "malformed":
        r = await client.post("/v1/chat/completions", content=rng.choice(MALFORMED),
                              headers={"Content-Type": "application/json"})
        return r.status_code, check_error(r) if r.status_code != 200 else "malformed body answered 200"
    if kind == "too_long":
        body = _chat_body(rng, cfg)
        body["messages"][0]["content"] = "word " * (cfg.context + 64)  # just over: refused, cheaply
        r = await client.post("/v1/chat/completions", json=body)
        return r.status_code, check_error(r) if r.status_code != 200 else "over-long prompt answered 200"
    return await _stream(client, kind == "drop", rng, cfg)


async def _stream(client: httpx.AsyncClient, drop: bool, rng: random.Random, cfg: SoakConfig):
    body = _chat_body(rng, cfg, stream=True, stream_options={"include_usage": True})
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, check_error(r)
        data = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data.append(line[6:])
                if drop:
                    return r.status_code, None  # leaving the block closes the connection mid-stream
    if not data or data[-1] != "[DONE]":
        return r.status_code, f"stream did not end with [DONE]: {data[-1:]}"
    for payload in data[:-1]:
        if "error" in json.loads(payload):
            return r.status_code, f"in-band error: {payload[:200]}"
    return r.status_code, None


async def _context(client: httpx.AsyncClient, model: str | None) -> int:
    r = await client.get("/v1/models")
    r.raise_for_status()
    cards = [c for c in r.json()["data"] if c.get("max_model_len") and (model is None or c["id"] == model)]
    if not cards:
        raise SystemExit("bench.soak: /v1/models names no chat model with a max_model_len")
    return int(cards[0]["max_model_len"])


async def _batch(client, kinds: list[str], rng: random.Random, cfg: SoakConfig, deadline: float) -> list[Outcome]:
    sem = asyncio.Semaphore(cfg.concurrency)
    seeds = [rng.randrange(2**32) for _ in kinds]

    async def run(kind: str, seed: int) -> Outcome | None:
        async with sem:
            if time.monotonic() > deadline:
                return None  # --max-seconds: stop sending, report what we have
            return await one(client, kind, random.Random(seed), cfg)

    results = await asyncio.gather(*(run(k, s) for k, s in zip(kinds, seeds)))
    return [o for o in results if o is not None]


async def run_soak(cfg: SoakConfig) -> Report:
    require_loopback(cfg.url)
    cfg.started = time.monotonic()
    rng = random.Random(cfg.seed)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=cfg.requests)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    deadline = time.monotonic() + cfg.max_seconds
    report = Report()
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, limits=limits, timeout=cfg.timeout) as client:
        if not cfg.context:
            cfg.context = await _context(client, cfg.model)
        # Warm-up at full concurrency: allocator pools, thread pools and caches reach their working size first,
        # so the memory comparison measures growth under load, not start-up.
        await _batch(client, rng.choices(list(MIX), weights=list(MIX.values()), k=cfg.warmup), rng, cfg, deadline)
        if cfg.pid:
            report.rss_before_kib = rss_kib(cfg.pid)
        started = time.monotonic()
        report.outcomes = await _batch(client, kinds, rng, cfg, deadline)
        report.seconds = time.monotonic() - started
    if cfg.pid:
        await asyncio.sleep(1.0)  # let dropped streams' cleanup finish
        report.rss_after_kib = rss_kib(cfg.pid)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=SoakConfig.url, help="server root on this machine (default %(default)s)")
    p.add_argument("--requests", type=int, default=SoakConfig.requests)
    p.add_argument("--concurrency", type=int, default=SoakConfig.concurrency)
    p.add_argument("--timeout", type=float, default=SoakConfig.timeout, help="seconds before a request is hung")
    p.add_argument("--max-seconds", type=float, default=SoakConfig.max_seconds, help="bound on the whole run")
    p.add_argument("--warmup", type=int, default=SoakConfig.warmup)
    p.add_argument("--api-key", default=None)
    p.add_argument("--pid", type=int, default=None, help="server process id, to report its resident memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)
    cfg = SoakConfig(**{k: v for k, v in vars(args).items() if k != "json"})
    summary = asyncio.run(run_soak(cfg)).summary()
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
