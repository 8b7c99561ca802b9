"""A bounded soak test for a glm-serve on this machine: mixed traffic, dropped streams, junk; then a verdict.

    .venv/bin/python -m bench.soak --url http://127.0.0.1:6006 --requests 1000 --concurrency 32 --pid <server pid>

Sends a fixed number of requests (then stops; --max-seconds bounds the wall time as well): chat completions,
streamed and not, with 1-8 new tokens; embeddings; streams dropped after their first chunk; malformed JSON;
prompts longer than the context. Every request must end within --timeout and be answered 200 or with a 4xx in
the OpenAI error shape (429 with Retry-After); a 5xx, a hang or a malformed answer is a violation. The server's
/metrics are read before and after: it must have counted every request exactly once, by the status the client saw.

With --pid it also follows the server's resident memory: warm-up rounds of --warmup requests run until a round
raises neither it nor its high-water mark by --plateau-percent (at most --warmup-rounds), then the measured
requests run with a sample every --sample-every requests; the verdict is the growth of their floor (the lowest
reading, first third to last), with the slope. Exit status 1 on any violation.

Loopback only: this is a test of our own server, never a load generator for someone else's.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from bench.soak_report import Outcome, Report, _reconcile, request_counts, rss_kib

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
    warmup: int = 200  # requests per warm-up round
    warmup_rounds: int = 5  # at most; a round that grows resident memory by < plateau_percent ends the warm-up
    plateau_percent: float = 1.0
    sample_every: int = 100  # resident memory sample every this many measured requests
    api_key: str | None = None
    pid: int | None = None
    seed: int = 0
    model: str | None = None
    context: int = 0  # the model's context in tokens; read from /v1/models when 0
    # A fault test: hooks[n]() runs when the n-th measured request is sent (e.g. SIGKILL the engine), and while the
    # engine is down a 503 OpenAI error with Retry-After, or a stream ending in an OpenAI error event, is expected.
    hooks: dict[int, object] = field(default_factory=dict)
    engine_down_ok: bool = False
    started: float = 0.0  # time.monotonic() when run_soak began; set by it


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"bench.soak only targets this machine (127.0.0.1, ::1, localhost), not {host!r}")


def check_error(r: httpx.Response, engine_down_ok: bool = False) -> str | None:
    """None if `r` is a well-formed refusal, else what is wrong with it."""
    if r.status_code >= 500 and not (engine_down_ok and r.status_code == 503):
        return f"server error: {r.text[:200]}"
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"not an OpenAI error body: {r.text[:200]}"
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"} or not err["message"]:
        return f"not an OpenAI error body: {r.text[:200]}"
    if r.status_code in (429, 503) and not r.headers.get("retry-after", "").isdigit():
        return f"{r.status_code} without Retry-After"
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
    error_event = False
    try:
        async with asyncio.timeout(cfg.timeout):
            status, problem, *event = await _send(client, kind, rng, cfg)
            error_event = bool(event and event[0])
    except TimeoutError:
        problem = "hung"
    except httpx.HTTPError as exc:
        problem = f"transport error: {type(exc).__name__}: {exc}"
    return Outcome(kind, status, time.monotonic() - started, problem, at=started - cfg.started,
                   error_event=error_event)


async def _send(client: httpx.AsyncClient, kind: str, rng: random.Random, cfg: SoakConfig):
    if kind == "chat":
        r = await client.post("/v1/chat/completions", json=_chat_body(rng, cfg))
        if r.status_code == 200:
            return r.status_code, None if r.json()["choices"][0]["message"]["content"] is not None else "no content"
        return r.status_code, check_error(r, cfg.engine_down_ok)
    if kind == "embed":
        texts = [f"soak text {rng.random()}" * rng.randint(1, 20) for _ in range(rng.randint(1, 8))]
        r = await client.post("/v1/embeddings", json={"input": texts})
        if r.status_code == 200:
            return r.status_code, None if len(r.json()["data"]) == len(texts) else "wrong number of vectors"
        return r.status_code, check_error(r, cfg.engine_down_ok)
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
            return r.status_code, check_error(r, cfg.engine_down_ok)
        data = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data.append(line[6:])
                if drop:
                    return r.status_code, None  # leaving the block closes the connection mid-stream
    if cfg.engine_down_ok and data and _is_error_event(data[-1]):
        return r.status_code, None, True  # the engine died under it: an error event ends the stream
    if not data or data[-1] != "[DONE]":
        return r.status_code, f"stream did not end with [DONE]: {data[-1:]}"
    for payload in data[:-1]:
        if "error" in json.loads(payload):
            return r.status_code, f"in-band error: {payload[:200]}"
    return r.status_code, None


def _is_error_event(payload: str) -> bool:
    try:
        err = json.loads(payload)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and bool(err["message"])


async def _context(client: httpx.AsyncClient, model: str | None) -> int:
    r = await client.get("/v1/models")
    r.raise_for_status()
    cards = [c for c in r.json()["data"] if c.get("max_model_len") and (model is None or c["id"] == model)]
    if not cards:
        raise SystemExit("bench.soak: /v1/models names no chat model with a max_model_len")
    return int(cards[0]["max_model_len"])


async def _batch(client, kinds: list[str], rng: random.Random, cfg: SoakConfig, deadline: float,
                 on_done=None, hooks=None, hook_times=None) -> list[Outcome]:
    """`kinds` at cfg.concurrency; `on_done(n)` after the n-th request ends (in order of ending), and
    `hooks[n]()` (hook_times[n] = when) as the n-th is sent."""
    sem = asyncio.Semaphore(cfg.concurrency)
    seeds = [rng.randrange(2**32) for _ in kinds]
    done = sent = 0

    async def run(kind: str, seed: int) -> Outcome | None:
        nonlocal done, sent
        async with sem:
            if time.monotonic() > deadline:
                return None  # --max-seconds: stop sending, report what we have
            sent += 1
            if hooks and sent in hooks:
                hooks[sent]()
                hook_times[sent] = time.monotonic() - cfg.started
            outcome = await one(client, kind, random.Random(seed), cfg)
        done += 1
        if on_done is not None:
            on_done(done)
        return outcome

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
        counted_before = await request_counts(client)
        await _warm_up(client, rng, cfg, deadline, report)
        if cfg.pid:
            report.rss_before_kib = rss_kib(cfg.pid)
            report.rss_samples.append((0, report.rss_before_kib))

        def sample(n: int) -> None:
            if cfg.pid and n % cfg.sample_every == 0 and n < len(kinds):
                report.rss_samples.append((n, rss_kib(cfg.pid)))

        started = time.monotonic()
        report.outcomes = await _batch(client, kinds, rng, cfg, deadline, on_done=sample, hooks=cfg.hooks,
                                       hook_times=report.hook_times)
        report.seconds = time.monotonic() - started
        report.metrics_mismatch = await _reconcile(client, counted_before,
                                                   report.warmup_outcomes + report.outcomes)
    if cfg.pid:
        await asyncio.sleep(1.0)  # let dropped streams' cleanup finish
        report.rss_after_kib = rss_kib(cfg.pid)
        report.rss_samples.append((len(report.outcomes), report.rss_after_kib))
    return report


async def _warm_up(client, rng: random.Random, cfg: SoakConfig, deadline: float, report: Report) -> None:
    """Rounds at full concurrency until resident memory stops rising: allocator pools, thread pools and caches
    reach their working size first (a one-off high-water mark), so the verdict measures growth under load.

    A round ends the warm-up when neither the reading after it nor the high-water mark rose by plateau_percent:
    the reading alone swings with work still being freed (it stopped a vLLM soak at 712 MiB, two rounds in, whose
    floor then settled at 725-745), and the high-water mark only rises, so it says when the working set stopped
    growing."""
    report.rss_start_kib = rss_kib(cfg.pid) if cfg.pid else None
    for _ in range(cfg.warmup_rounds if cfg.pid else min(cfg.warmup_rounds, 1)):
        kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=cfg.warmup)
        report.warmup_outcomes += await _batch(client, kinds, rng, cfg, deadline)
        if not cfg.pid:
            return
        await asyncio.sleep(0.5)  # dropped streams' cleanup, as before the final reading
        report.warmup_rss_kib.append(rss_kib(cfg.pid))
        report.warmup_hwm_kib.append(rss_kib(cfg.pid, "VmHWM"))
        if plateaued(report.warmup_rss_kib, report.warmup_hwm_kib, cfg.plateau_percent):
            return


def plateaued(readings: list[int], high_water: list[int], percent: float) -> bool:
    if len(readings) < 2:
        return False
    return all(100 * (b - a) / a < percent for a, b in (readings[-2:], high_water[-2:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=SoakConfig.url, help="server root on this machine (default %(default)s)")
    p.add_argument("--requests", type=int, default=SoakConfig.requests)
    p.add_argument("--concurrency", type=int, default=SoakConfig.concurrency)
    p.add_argument("--timeout", type=float, default=SoakConfig.timeout, help="seconds before a request is hung")
    p.add_argument("--max-seconds", type=float, default=SoakConfig.max_seconds, help="bound on the whole run")
    p.add_argument("--warmup", type=int, default=SoakConfig.warmup, help="requests per warm-up round")
    p.add_argument("--warmup-rounds", type=int, default=SoakConfig.warmup_rounds, help="at most this many")
    p.add_argument("--plateau-percent", type=float, default=SoakConfig.plateau_percent,
                   help="a warm-up round raising neither resident memory nor its high-water mark by this much ends it")
    p.add_argument("--sample-every", type=int, default=SoakConfig.sample_every)
    p.add_argument("--api-key", default=None)
    p.add_argument("--pid", type=int, default=None, help="server process id, to report its resident memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None)
    p.add_argument("--kill-engine-at", type=int, default=None, metavar="N",
                   help="SIGKILL --engine-pid as the N-th measured request is sent; 503s and stream error events "
                   "are then expected answers")
    p.add_argument("--engine-pid", type=int, default=None, help="the engine process (e.g. glm-serve's vLLM child)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)
    opts = {k: v for k, v in vars(args).items() if k not in ("json", "kill_engine_at", "engine_pid")}
    cfg = SoakConfig(**opts)
    if args.kill_engine_at is not None:
        if args.engine_pid is None:
            p.error("--kill-engine-at needs --engine-pid")
        cfg.hooks = {args.kill_engine_at: lambda: os.kill(args.engine_pid, signal.SIGKILL)}
        cfg.engine_down_ok = True
    summary = asyncio.run(run_soak(cfg)).summary()
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if summary["violations"] or summary["metrics_mismatch"] else 0


if __name__ == "__main__":
    sys.exit(main())
