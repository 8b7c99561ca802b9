"""Structured outputs under load: json_schema streams against free ones in the same run, and grammar compile time.

    .venv/bin/python -m bench.structured --base-url http://127.0.0.1:6006/v1 --max-concurrency 16 \\
        --num-prompts 48 --rounds 2 --result-json bench/results/structured.json

Throughput: at each concurrency level, the same number of distinct prompts is sent free and with a
`response_format` json_schema (one schema, compiled once before timing), alternating free / constrained for
`--rounds` rounds so that noise on a shared machine falls on both; the ratio is of the medians. The prompts ask for
JSON either way, so both kinds of request generate similar answers. Tokens per second count the tokens the server
reports (usage): a constrained answer that closes its JSON early is shorter, not penalised.

Compile time: each of `--schemas` distinct schemas (same shape, their own property names) is sent once cold and once
warm, one request at a time, with max_tokens 1; cold minus warm is what compiling that schema cost the request
(building the grammar, and on the native engine the token-mask tables; vLLM compiles in its own process, which the
difference includes as well). Any OpenAI-compatible server works, vLLM's own included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as `python bench/structured.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import compute_metrics, generate_prompts, parse_int_list, percentile, summarize_ms  # noqa: E402
from bench.serve import _headers, build_parser, discover_model, run_level, stream_request  # noqa: E402

INSTRUCTION = "Answer with a JSON object that has a title, a list of tags, a score from 0 to 100 and a summary. "
_KINDS = ({"type": "string"}, {"type": "integer", "minimum": 0, "maximum": 100},
          {"type": "array", "items": {"type": "string"}}, {"type": "boolean"})


def schema(names: tuple[str, str, str, str] = ("title", "tags", "score", "summary")) -> dict[str, Any]:
    title, tags, score, summary = names
    return {"type": "object", "additionalProperties": False, "required": list(names),
            "properties": {title: {"type": "string"}, tags: {"type": "array", "items": {"type": "string"}},
                           score: {"type": "integer", "minimum": 0, "maximum": 100},
                           summary: {"type": "string"}}}


def distinct_schemas(count: int, seed: int) -> list[dict[str, Any]]:
    """`count` schemas no server has seen: same shape, property names of their own (and a varying fifth field)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        names = tuple(f"{w}_{i}_{rng.randrange(10**6)}" for w in ("title", "tags", "score", "summary"))
        s = schema(names)  # type: ignore[arg-type]
        extra = f"extra_{i}"
        s["properties"][extra] = rng.choice(_KINDS)
        s["required"].append(extra)
        out.append(s)
    return out


def response_format(s: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": s, "strict": True}}}


async def compile_times(client: httpx.AsyncClient, args, url: str, headers: dict[str, str], model: str | None,
                        schemas: list[dict[str, Any]]) -> list[float]:
    """Seconds per schema: the first request's latency minus the second's (same schema, same prompt)."""
    times = []
    for i, s in enumerate(schemas):
        body = {"messages": [{"role": "user", "content": INSTRUCTION + f"Item {i}."}], "max_tokens": 1,
                "temperature": 0, "stream": True, **({"model": model} if model else {}), **response_format(s)}
        cold = await stream_request(client, url, headers, body, args.timeout)
        warm = await stream_request(client, url, headers, body, args.timeout)
        for r in (cold, warm):
            if not r.success:
                raise SystemExit(f"a json_schema request failed: HTTP {r.status}: {r.error}")
        times.append(max(0.0, cold.e2e - warm.e2e))
    return times


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    serve_args = build_parser().parse_args(["--output-len", str(args.output_len), "--timeout", str(args.timeout),
                                            "--disable-tqdm"])
    base_url = args.base_url.rstrip("/")
    url = f"{base_url}/chat/completions"
    headers = _headers(args.api_key)
    levels = parse_int_list(args.max_concurrency)
    rf = response_format(schema())
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.timeout, connect=30.0)) as client:
        model = args.model or await discover_model(base_url, headers)
        compiles = await compile_times(client, serve_args, url, headers, model,
                                       distinct_schemas(args.schemas, args.seed))
        print(f"compile (cold - warm latency) over {len(compiles)} schemas: "
              f"{json.dumps(summarize_ms(compiles))}", flush=True)
        # the throughput schema is compiled here, untimed, as a server in use would have it
        await compile_times(client, serve_args, url, headers, model, [schema()])
        words = max(1, args.input_len - len(INSTRUCTION.split()))
        n_prompts = sum(2 * args.num_prompts * args.rounds + level for level in levels)
        prompts = [INSTRUCTION + p for p in generate_prompts(n_prompts, words, args.seed)]
        runs: list[dict[str, Any]] = []
        offset = 0
        for level in levels:
            # untimed, free: the first full batch of a fresh server is slower (measured 10-30%) on every engine
            batch = prompts[offset: offset + level]
            offset += level
            await run_level(client, serve_args, url, headers, model, batch, level, {})
            for rnd in range(args.rounds):
                order = ("free", "json_schema") if rnd % 2 == 0 else ("json_schema", "free")
                for kind in order:
                    batch = prompts[offset: offset + args.num_prompts]
                    offset += args.num_prompts
                    extra = rf if kind == "json_schema" else {}
                    results, duration, _ = await run_level(client, serve_args, url, headers, model, batch, level,
                                                           extra)
                    m = compute_metrics(results, duration)
                    if m["failed"]:
                        raise SystemExit(f"{kind} requests failed: {m['errors']}")
                    runs.append({"kind": kind, "concurrency": level, "round": rnd + 1, "metrics": m})
                    print(f"c={level:<3} round {rnd + 1} {kind:<11} {m['output_throughput']:7.1f} tok/s  "
                          f"TTFT p50 {m['ttft_ms']['median'] / 1000:5.2f} s  "
                          f"{m['total_output_tokens'] / max(1, m['completed']):5.1f} tokens/answer", flush=True)
    summary = []
    for level in levels:
        tps = {k: percentile([r["metrics"]["output_throughput"] for r in runs
                          if r["kind"] == k and r["concurrency"] == level], 50) for k in ("free", "json_schema")}
        summary.append({"concurrency": level, "free_tok_s": round(tps["free"], 1),
                        "json_schema_tok_s": round(tps["json_schema"], 1),
                        "ratio": round(tps["json_schema"] / tps["free"], 3)})
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "base_url": base_url, "model": model,
            "compile_ms": summarize_ms(compiles), "compile_s_each": [round(t, 4) for t in compiles],
            "summary": summary, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:6006/v1")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-concurrency", default="16")
    ap.add_argument("--num-prompts", type=int, default=48, help="per kind, level and round")
    ap.add_argument("--rounds", type=int, default=2, help="free / constrained pairs per level (order alternates)")
    ap.add_argument("--input-len", type=int, default=100, help="words per prompt, the instruction included")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--schemas", type=int, default=20, help="distinct schemas whose compile time is measured")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result-json")
    args = ap.parse_args()
    started = time.monotonic()
    result = asyncio.run(main_async(args))
    print()
    print("| streams | free tok/s | json_schema tok/s | constrained / free |")
    print("|---:|---:|---:|---:|")
    for s in result["summary"]:
        print(f"| {s['concurrency']} | {s['free_tok_s']} | {s['json_schema_tok_s']} | {s['ratio']:.2f}x |")
    c = result["compile_ms"]
    print(f"\ngrammar compile per new schema: p50 {c['p50']:.0f} ms, p99 {c['p99']:.0f} ms "
          f"({len(result['compile_s_each'])} schemas); {time.monotonic() - started:.0f} s in all")
    if args.result_json:
        Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
