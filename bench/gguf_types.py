"""ChatGLM3 as f32 / f16 / q8_0 / q4_0 GGUFs on glm-serve's llama.cpp engine: file size, memory, speed, agreement.

    .venv/bin/python -m bench.gguf_types --result-json docs/bench-gguf-types-cpu.json

Each type is converted from one ChatGLM3 folder by `python -m server.convert` (default: the random checkpoint with
the real 6B head layout that ../shared/fixtures/chatglm3/make_vllm_shape.py writes), served by glm-serve with
ENGINE=llamacpp and LLAMACPP_GGUF=<file>, all servers up at once (started as bench/engines.py starts them), then:

- llama-server's resident memory (VmRSS of glm-serve's llama-server child) after load and after the run, and its
  peak (VmHWM);
- agreement with the reference type (f16) over HOLDOUT, one request at a time, greedy, `--agree-tokens` tokens:
  the share of answers equal to the reference's, and the mean share of leading tokens equal to it. ENGINE=llamacpp
  returns no logprobs, so no token ids: both answers are tokenized again with ChatGLM3's own tokenizer, which is
  deterministic, so equal texts give equal ids and the first differing token is found to within one token (a
  merge across the point where the texts part can move it by one);
- decode speed with bench.serve at each `--concurrency`, the types taking turns level by level for `--rounds`
  rounds (noise on a shared machine then falls on all of them alike); the median of the rounds is reported, as
  output tokens/s (bench.serve's: generated tokens over the level's wall time, prefill included) and TPOT p50.

On a random-weight model agreement measures numerical fidelity to f16 (how often rounding the weights flips a
greedy choice), not answer quality: its greedy margins are not a trained model's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

if __package__ in (None, ""):  # run as `python bench/gguf_types.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile  # noqa: E402
from bench.engines import REPO, start, stop  # noqa: E402

NAME = "chatglm3-6b"
FIXTURES = REPO.parent / "shared" / "fixtures" / "chatglm3"

# Hold-out chats of our own making (never used to build or tune anything): Chinese and English, one turn and
# several, with and without a system prompt, code, numbers, emoji.
HOLDOUT: list[list[dict[str, str]]] = [[{"role": "user", "content": c}] for c in (
    "你好，请介绍一下你自己。",
    "Write a haiku about the sea.",
    "用三句话解释什么是量子纠缠。",
    "What is the capital of Australia, and why is it not Sydney?",
    "请把这句话翻译成英文：今天的天气非常好，我们去公园散步吧。",
    "List five prime numbers greater than 100.",
    "写一首关于秋天的五言绝句。",
    "Explain the difference between a list and a tuple in Python.",
    "如何用 Python 读取一个 CSV 文件？请给出代码。",
    "Give me three tips for sleeping better. 🌙",
    "北京和上海哪个城市的人口更多？",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "def fib(n):\n    # complete this function",
    "计算 37 乘以 43 等于多少，并写出步骤。",
)] + [
    [{"role": "system", "content": "You are a helpful assistant who answers briefly."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": "你是一名专业的中文写作助手。"},
     {"role": "user", "content": "帮我写一段产品介绍，产品是一款智能水杯。"}],
    [{"role": "user", "content": "My name is Lin."}, {"role": "assistant", "content": "Nice to meet you, Lin!"},
     {"role": "user", "content": "What is my name?"}],
    [{"role": "user", "content": "我想学做饭。"}, {"role": "assistant", "content": "好的，你想从哪道菜开始？"},
     {"role": "user", "content": "番茄炒蛋怎么做？"}],
    [{"role": "user", "content": "Translate to French: 'The train leaves at 7:45 tomorrow morning.'"}],
    [{"role": "user", "content": "请用 JSON 格式列出三种水果及其颜色。"}],
]


# --------------------------------------------------------------------------- pure helpers


def leading_agreement(reference: list[int], other: list[int]) -> float:
    """The share of leading tokens two answers have in common, over the longer one (1.0 for two empty answers)."""
    longest = max(len(reference), len(other))
    if not longest:
        return 1.0
    same = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        same += 1
    return same / longest


def agreement(reference: list[str], answers: list[str], encode) -> dict:
    """Exact-match rate and mean leading-token agreement of `answers` against `reference` (same prompts)."""
    if len(reference) != len(answers) or not answers:
        raise ValueError("agreement needs one answer per reference answer")
    each = [leading_agreement(encode(r), encode(a)) for r, a in zip(reference, answers)]
    return {"exact_match": sum(r == a for r, a in zip(reference, answers)) / len(answers),
            "leading_tokens": sum(each) / len(each), "per_prompt": [round(x, 4) for x in each]}


def status_kib(status: str, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM) in KiB."""
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"no {field} in the process status")


def descendants(parents: dict[int, int], root: int) -> list[int]:
    """Every pid below `root` in a {pid: parent pid} map, nearest first."""
    out, frontier = [], [root]
    while frontier:
        frontier = sorted(pid for pid, ppid in parents.items() if ppid in frontier)
        out += frontier
    return out


# --------------------------------------------------------------------------- processes


def _parents() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                # the command name is in parentheses and may hold spaces: ppid is the 2nd field after the last ")"
                out[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return out


def llama_child(glm_pid: int) -> int:
    for pid in descendants(_parents(), glm_pid):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "llama-server":
                return pid
    raise SystemExit(f"glm-serve (pid {glm_pid}) has no llama-server child")


def memory(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return {"rss_kib": status_kib(status, "VmRSS"), "hwm_kib": status_kib(status, "VmHWM")}


# --------------------------------------------------------------------------- measurements


def answers(port: int, max_tokens: int) -> list[str]:
    """HOLDOUT's greedy answers, one request at a time (an answer then never depends on what shares its batch)."""
    out = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=300) as client:
        for messages in HOLDOUT:
            r = client.post("/chat/completions", json={"model": NAME, "messages": messages, "temperature": 0,
                                                       "max_tokens": max_tokens})
            r.raise_for_status()
            out.append(r.json()["choices"][0]["message"]["content"] or "")
    return out


def speed(port: int, level: int, prompts: int, args) -> dict:
    from bench.serve import build_parser, main_async

    serve_args = build_parser().parse_args([
        "--base-url", f"http://127.0.0.1:{port}/v1", "--model", NAME, "--max-concurrency", str(level),
        "--num-prompts", str(prompts), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--seed", str(level), "--disable-tqdm", *(["--extra-body", json.dumps({"top_k": args.top_k})]
                                                  if args.top_k is not None else [])])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        m = asyncio.run(main_async(serve_args))[0]["metrics"]
    if m["failed"]:
        raise SystemExit(f"port {port}: {m['failed']} requests failed: {m['errors']}")
    return m


def model_folder(args, tmp: Path) -> Path:
    if args.model:
        return Path(args.model)
    folder = tmp / "chatglm3"
    subprocess.run([sys.executable, str(FIXTURES / "make_vllm_shape.py"), str(folder), str(FIXTURES)], check=True,
                   stdout=subprocess.DEVNULL)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gguf_types", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a ChatGLM3 folder (default: make_vllm_shape.py's random checkpoint)")
    ap.add_argument("--types", default="f32,f16,q8_0,q4_0")
    ap.add_argument("--reference", default="f16", help="the type the others' answers are compared with")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--num-prompts", default="8,32", help="per concurrency level and round")
    ap.add_argument("--input-len", type=int, default=60, help="words per speed prompt")
    ap.add_argument("--output-len", type=int, default=64, help="max_tokens of a speed request")
    ap.add_argument("--agree-tokens", type=int, default=32, help="max_tokens of a hold-out answer")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top-k", type=int, help="top_k of the speed requests (greedy either way); unset: none sent, "
                    "which glm-serve passes to llama.cpp as top_k 0, a sort of the whole vocabulary per token")
    ap.add_argument("--llama-server", default=str(REPO / "build" / "llama.cpp" / "bin" / "llama-server"))
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--port", type=int, default=6330, help="the first server's port; the others take the next ones")
    ap.add_argument("--result-json")
    args = ap.parse_args()
    types = args.types.split(",")
    if args.reference not in types:
        raise SystemExit(f"--reference {args.reference} is not in --types")
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = [int(n) for n in args.num_prompts.split(",")]
    ports = {kind: args.port + i for i, kind in enumerate(types)}
    sys.path.insert(0, str(REPO))
    from server.convert import convert
    from server.families.chatglm3.tokenizer import ChatGLM3Tokenizer

    started, load_start = time.monotonic(), os.getloadavg()
    rows: dict[str, dict] = {}
    runs: list[dict] = []
    procs: dict[str, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args, Path(tmp))
        config = json.loads((folder / "config.json").read_text())
        encode = ChatGLM3Tokenizer(folder / "tokenizer.model").sp_encode
        try:
            for kind in types:
                t0 = time.monotonic()
                gguf = convert(str(folder), Path(tmp) / f"chatglm3.{kind}.gguf", kind)
                rows[kind] = {"type": kind, "file_bytes": gguf.stat().st_size,
                              "convert_s": round(time.monotonic() - t0, 1)}
                env = {"MODEL_PATH": str(folder), "SERVED_MODEL_NAME": NAME, "EMBEDDING_PATH": "none",
                       "WEB_UI": "false", "LOG_LEVEL": "warning", "ENGINE": "llamacpp", "LLAMACPP_GGUF": str(gguf),
                       "LLAMA_SERVER": args.llama_server, "MAX_RUNNING_REQUESTS": str(max(levels)),
                       "MAX_WAITING_REQUESTS": "256",
                       # the slots share one KV pool of the model's context (2048 here): room for every stream
                       "LLAMACPP_ARGS": "--ctx-size 8192"}
                cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(ports[kind])]
                procs[kind] = start(kind, cmd, env, args, ports[kind], Path(tmp))
                rows[kind]["after_load"] = memory(llama_child(procs[kind].pid))
            for kind in types:
                rows[kind]["answers"] = answers(ports[kind], args.agree_tokens)
            for rnd in range(1, args.rounds + 1):
                order = types[rnd - 1:] + types[: rnd - 1]
                for level, n in zip(levels, prompts):
                    for kind in order:
                        load = os.getloadavg()[0]
                        m = speed(ports[kind], level, n, args)
                        runs.append({"type": kind, "concurrency": level, "round": rnd, "load_before": round(load, 2),
                                     "metrics": m})
                        print(f"round {rnd} c={level:<3} {kind:<5} {m['output_throughput']:7.1f} tok/s  "
                              f"TPOT p50 {m['tpot_ms']['median']:6.1f} ms  (load {load:.2f})", flush=True)
            for kind in types:
                rows[kind]["after_run"] = memory(llama_child(procs[kind].pid))
        finally:
            for proc in procs.values():
                stop(proc)
    reference = rows[args.reference]["answers"]
    for kind in types:
        rows[kind]["agreement"] = agreement(reference, rows[kind].pop("answers"), encode)
        rows[kind]["tok_s"] = {str(c): round(percentile([r["metrics"]["output_throughput"] for r in runs
                                                         if r["type"] == kind and r["concurrency"] == c], 50), 1)
                               for c in levels}
        rows[kind]["tpot_ms_p50"] = {str(c): round(percentile([r["metrics"]["tpot_ms"]["median"] for r in runs
                                                               if r["type"] == kind and r["concurrency"] == c], 50), 1)
                                     for c in levels}
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in os.getloadavg()],
              "seconds": round(time.monotonic() - started), "cpus": os.cpu_count(), "reference": args.reference,
              "model": {k: config.get(k) for k in ("_name_or_path", "num_layers", "hidden_size", "num_attention_heads",
                                                   "kv_channels", "multi_query_group_num", "ffn_hidden_size",
                                                   "padded_vocab_size")},
              "holdout_prompts": len(HOLDOUT), "agree_tokens": args.agree_tokens,
              "speed": {"concurrency": levels, "num_prompts": prompts, "rounds": args.rounds,
                        "input_len_words": args.input_len, "output_len": args.output_len, "top_k": args.top_k},
              "types": list(rows.values()), "runs": runs}
    print()
    print(table(result))
    print(f"\n{result['seconds']} s in all; load {result['load_start'][0]} -> {result['load_end'][0]}")
    if args.result_json:
        Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_json).write_text(json.dumps(result, indent=1) + "\n")


def table(result: dict) -> str:
    levels = result["speed"]["concurrency"]
    ref = result["reference"]
    lines = ["| type | file MiB | llama-server RSS after load / after run / peak MiB | "
             + " | ".join(f"tok/s @ {c}" for c in levels)
             + f" | exact answers vs {ref} | leading tokens vs {ref} |",
             "|---|---:|---:|" + "---:|" * len(levels) + "---:|---:|"]
    for row in result["types"]:
        mem = " / ".join(f"{row[k][f] / 1024:.0f}" for k, f in (("after_load", "rss_kib"), ("after_run", "rss_kib"),
                                                               ("after_run", "hwm_kib")))
        agree = row["agreement"]
        lines.append(f"| {row['type']} | {row['file_bytes'] / 2**20:.1f} | {mem} | "
                     + " | ".join(f"{row['tok_s'][str(c)]:.1f}" for c in levels)
                     + f" | {agree['exact_match']:.0%} | {agree['leading_tokens']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
