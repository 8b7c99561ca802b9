"""Online serving benchmark for any OpenAI-compatible server, shaped like `vllm bench serve`.

Streams chat completions (`stream_options.include_usage`) with generated prompts and measures TTFT,
TPOT, ITL and end-to-end latency per request, and throughput per concurrency level:

    .venv/bin/python -m bench.serve --base-url http://127.0.0.1:6006/v1 --max-concurrency 1,4,16 \\
        --num-prompts 64 --input-len 200 --output-len 64 --label glm-serve \\
        --result-json bench/results/glm.json --plot bench/results/glm.png

See bench/README.md for the metrics and how to benchmark other servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as `python bench/serve.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SSE_DONE,
    RequestResult,
    chunk_text,
    compute_metrics,
    format_result_table,
    format_sweep_table,
    generate_prompts,
    json_safe,
    parse_int_list,
    parse_sse_line,
    pick_chat_model,
    poisson_delays,
)
from server.backends.child.client import sse_lines  # noqa: E402  (not aiter_lines: it splits inside a JSON string)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base-url", default="http://127.0.0.1:6006/v1", help="OpenAI base URL, ending in /v1")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token ($OPENAI_API_KEY)")
    p.add_argument("--model", default=None, help="model id (default: first chat model of GET /models)")
    p.add_argument(
        "--endpoint", default="/chat/completions", help="path under --base-url; /completions sends a plain prompt"
    )
    p.add_argument(
        "--num-prompts",
        default=None,
        help="requests per concurrency level; one value, or one per level (8,32,64); default 4 x concurrency, >= 16",
    )
    p.add_argument("--max-concurrency", default="1,4,16", help="in-flight request cap; a list sweeps: 1,4,16")
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s with Poisson arrivals; inf: all at once")
    p.add_argument("--input-len", type=int, default=200, help="approximate words per prompt")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="prompts and arrival times")
    p.add_argument("--extra-body", default=None, help="JSON merged into each request, e.g. '{\"ignore_eos\": true}'")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (untimed) before the first level")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a whole request may take (queueing included)")
    p.add_argument("--label", default=None, help="name of this run in tables/plots (default: the host)")
    p.add_argument("--result-json", default=None, help="write the runs (config + metrics) as a JSON list")
    p.add_argument("--append", action="store_true", help="append to --result-json instead of overwriting")
    p.add_argument("--save-detailed", action="store_true", help="also store per-request measurements")
    p.add_argument("--plot", default=None, help="PNG: output tok/s and median TTFT vs concurrency")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--trust-env", action="store_true", help="honour HTTP(S)_PROXY etc. (off: talk directly)")
    return p


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


async def discover_model(base_url: str, headers: dict[str, str], trust_env: bool = False) -> str | None:
    # A client of its own: a server that fails this call may close the connection, which must not be
    # reused by the first timed request.
    try:
        async with httpx.AsyncClient(timeout=30, trust_env=trust_env) as client:
            resp = await client.get(f"{base_url}/models", headers=headers)
        resp.raise_for_status()
        return pick_chat_model(resp.json())
    except (httpx.HTTPError, ValueError) as exc:
        print(f"warning: GET {base_url}/models failed ({exc!r}); sending requests without a model", file=sys.stderr)
        return None


async def stream_request(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any], timeout: float | None = None
) -> RequestResult:
    """Send one streamed chat completion and time it; `timeout` bounds the whole request (s)."""
    res = RequestResult()
    try:
        async with asyncio.timeout(timeout):
            return await _stream_request(client, url, headers, body, res)
    except TimeoutError:
        res.e2e = time.perf_counter() - res.start
        res.success = False
        res.error = f"timed out after {timeout:g} s"
        return res


async def _stream_request(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any], res: RequestResult
) -> RequestResult:
    res.start = start = time.perf_counter()
    last = start
    chunks_with_text = 0
    try:
        async with client.stream("POST", url, headers=headers, json=body) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                raw = await resp.aread()
                res.error = raw.decode("utf-8", "replace").strip()[:500] or resp.reason_phrase
                res.e2e = time.perf_counter() - start
                return res
            async for line in sse_lines(resp):
                try:
                    event = parse_sse_line(line)
                except ValueError as exc:
                    res.error = f"bad SSE data: {exc}"
                    break
                if event is None:
                    continue
                if event == SSE_DONE:
                    break
                assert isinstance(event, dict)
                if "error" in event and not event.get("choices"):
                    err = event["error"]
                    res.error = str(err.get("message", err) if isinstance(err, dict) else err)[:500]
                    break
                now = time.perf_counter()
                if chunk_text(event):
                    if chunks_with_text == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks_with_text += 1
                usage = event.get("usage")
                if isinstance(usage, dict):
                    res.usage_reported = True
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        res.e2e = time.perf_counter() - start
    except (httpx.HTTPError, OSError) as exc:
        res.e2e = time.perf_counter() - start
        res.error = f"{type(exc).__name__}: {exc}"[:500]
        return res
    res.chunks = chunks_with_text
    if not res.usage_reported:
        res.output_tokens = chunks_with_text
    if not res.error:
        if chunks_with_text == 0:
            res.error = "stream ended without generated text"
        else:
            res.success = True
    return res


def make_body(args: argparse.Namespace, model: str | None, prompt: str, extra: dict[str, Any]) -> dict[str, Any]:
    legacy = args.endpoint.rstrip("/").endswith("/completions") and "chat" not in args.endpoint
    body: dict[str, Any] = {
        **({"prompt": prompt} if legacy else {"messages": [{"role": "user", "content": prompt}]}),
        "max_tokens": args.output_len,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    body.update(extra)
    return body


async def run_level(
    client: httpx.AsyncClient,
    args: argparse.Namespace,
    url: str,
    headers: dict[str, str],
    model: str | None,
    prompts: Sequence[str],
    concurrency: int,
    extra: dict[str, Any],
) -> tuple[list[RequestResult], float, int]:
    """Send `prompts` with at most `concurrency` in flight. Returns results, duration and peak in-flight."""
    sem = asyncio.Semaphore(concurrency)
    delays = poisson_delays(len(prompts), args.request_rate, args.seed + concurrency)
    in_flight = 0
    peak = 0
    bar = None
    if not args.disable_tqdm:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=f"concurrency {concurrency}", unit="req", file=sys.stderr)

    async def one(prompt: str) -> RequestResult:
        nonlocal in_flight, peak
        async with sem:
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await stream_request(client, url, headers, make_body(args, model, prompt, extra), args.timeout)
            finally:
                in_flight -= 1
                if bar is not None:
                    bar.update(1)

    start = time.perf_counter()
    tasks = []
    for prompt, delay in zip(prompts, delays, strict=True):
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(prompt)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return list(results), duration, peak


def prompts_per_level(num_prompts: str | int | None, levels: Sequence[int]) -> list[int]:
    if num_prompts is None:
        return [max(16, 4 * c) for c in levels]
    counts = parse_int_list(num_prompts)
    if len(counts) == 1:
        return counts * len(levels)
    if len(counts) != len(levels):
        raise SystemExit(f"--num-prompts has {len(counts)} values for {len(levels)} concurrency levels")
    return counts


def _host(base_url: str) -> str:
    return httpx.URL(base_url).netloc.decode() or base_url


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    levels = parse_int_list(args.max_concurrency)
    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise SystemExit("--extra-body must be a JSON object")
    base_url = args.base_url.rstrip("/")
    url = f"{base_url}/{args.endpoint.lstrip('/')}"
    headers = _headers(args.api_key)
    label = args.label or _host(base_url)
    per_level = prompts_per_level(args.num_prompts, levels)
    # distinct prompts everywhere, warm-up included: no level can profit from another one's prefix cache
    all_prompts = generate_prompts(args.warmup + sum(per_level), args.input_len, args.seed)
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    timeout = httpx.Timeout(args.timeout, connect=min(30.0, args.timeout))
    runs: list[dict[str, Any]] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=args.trust_env) as client:
        model = args.model or await discover_model(base_url, headers, args.trust_env)
        print(f"benchmarking {url} model={model!r} label={label!r} levels={levels}", file=sys.stderr)
        offset = 0
        if args.warmup:
            warm = await asyncio.gather(
                *(
                    stream_request(client, url, headers, make_body(args, model, p, extra), args.timeout)
                    for p in all_prompts[: args.warmup]
                )
            )
            offset = args.warmup
            bad = [r for r in warm if not r.success]
            if bad:
                raise SystemExit(f"warm-up request failed: HTTP {bad[0].status}: {bad[0].error}")
        for concurrency, n in zip(levels, per_level, strict=True):
            prompts = all_prompts[offset : offset + n]
            if n < concurrency:
                print(f"warning: {n} prompts cannot keep {concurrency} requests in flight", file=sys.stderr)
            offset += n
            results, duration, peak = await run_level(client, args, url, headers, model, prompts, concurrency, extra)
            metrics = compute_metrics(results, duration)
            metrics["max_concurrency"] = concurrency
            metrics["peak_in_flight"] = peak
            if not math.isinf(args.request_rate):
                metrics["request_rate"] = args.request_rate
            config = {
                "base_url": base_url,
                "endpoint": args.endpoint,
                "model": model,
                "num_prompts": n,
                "max_concurrency": concurrency,
                "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
                "input_len_words": args.input_len,
                "output_len": args.output_len,
                "temperature": args.temperature,
                "seed": args.seed,
                "extra_body": extra,
                "timeout": args.timeout,
            }
            run: dict[str, Any] = {
                "label": label,
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "config": config,
                "metrics": metrics,
            }
            if args.save_detailed:
                run["requests"] = [
                    {
                        "success": r.success,
                        "status": r.status,
                        "error": r.error,
                        "ttft": r.ttft,
                        "e2e": r.e2e,
                        "output_tokens": r.output_tokens,
                        "prompt_tokens": r.prompt_tokens,
                        "itl": r.itl,
                    }
                    for r in results
                ]
            runs.append(run)
            print(format_result_table(metrics, f"{label} @ concurrency {concurrency}"))
            sys.stdout.flush()
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runs = asyncio.run(main_async(args))
    if len(runs) > 1:
        print()
        print(format_sweep_table(runs))
    all_runs = runs
    if args.result_json:
        path = Path(args.result_json)
        if args.append and path.exists():
            previous = json.loads(path.read_text())
            all_runs = (previous if isinstance(previous, list) else [previous]) + runs
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(all_runs), indent=2) + "\n")
        print(f"results: {path}", file=sys.stderr)
    if args.plot:
        from bench.plot import plot_runs

        print(f"plot: {plot_runs(all_runs, args.plot)}", file=sys.stderr)


if __name__ == "__main__":
    main()
