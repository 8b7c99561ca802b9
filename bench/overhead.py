"""Streaming overhead at concurrency 1: the HTTP/SSE path against calling the engine directly.

Both sides run the same greedy requests (same prompts, same max_tokens, so the same tokens) one at a
time on the same settings; the ratio of their output tokens/s is the cost of FastAPI + SSE + JSON.
The two are measured alternately (engine, then server) so a busy machine hurts both alike.

    .venv/bin/python -m bench.overhead --requests 6 --max-tokens 96
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import httpx

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how a bicycle works, in detail.",
    "Describe a journey across a desert.",
    "Write a long letter to a friend about the ocean.",
]


async def direct(engine, prompt: str, max_tokens: int) -> tuple[int, float]:
    from server.types import ChatRequest, Finished, SamplingParams

    req = ChatRequest([{"role": "user", "content": prompt}], SamplingParams(max_tokens=max_tokens, temperature=0))
    started = time.perf_counter()
    async for event in engine.chat(engine.prepare(req)):
        if isinstance(event, Finished):
            return event.completion_tokens, time.perf_counter() - started
    raise RuntimeError("no Finished event")


def over_http(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    tokens = 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--port", type=int, default=6199)
    ap.add_argument("--result-json")
    args = ap.parse_args()

    from server.bootstrap import build_chat
    from server.config import Settings

    settings = Settings(embedding_path="none", web_ui=False)
    engine = build_chat(settings)
    env = {**os.environ, "EMBEDDING_PATH": "none", "WEB_UI": "false", "LOG_LEVEL": "warning"}
    server = subprocess.Popen([sys.executable, "-m", "server", "--port", str(args.port)], env=env)
    url = f"http://127.0.0.1:{args.port}"
    try:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(engine.start())
        with httpx.Client(timeout=600) as client:
            for _ in range(600):
                try:
                    if client.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            loop.run_until_complete(direct(engine, "warm up", 8))
            over_http(client, url, "warm up", 8)
            d_rates, h_rates = [], []
            for i in range(args.requests):
                prompt = PROMPTS[i % len(PROMPTS)]
                n_d, t_d = loop.run_until_complete(direct(engine, prompt, args.max_tokens))
                n_h, t_h = over_http(client, url, prompt, args.max_tokens)
                assert n_d == n_h, f"greedy runs differ in length: {n_d} vs {n_h}"
                d_rates.append(n_d / t_d)
                h_rates.append(n_h / t_h)
        loop.run_until_complete(engine.stop())
    finally:
        server.terminate()
        server.wait(60)
    d, h = statistics.median(d_rates), statistics.median(h_rates)
    result = {"direct_tok_s": d, "http_stream_tok_s": h, "overhead_pct": (d - h) / d * 100,
              "requests": args.requests, "max_tokens": args.max_tokens}
    print(f"direct engine      {d:8.2f} tok/s (median of {args.requests})")
    print(f"HTTP streaming     {h:8.2f} tok/s")
    print(f"streaming overhead {result['overhead_pct']:8.2f} %")
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
