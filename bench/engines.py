"""Side by side in one run: glm-serve's native engine, glm-serve on vLLM, vLLM's own OpenAI server, glm-serve on
llama.cpp and llama.cpp's own llama-server.

Each server gets the same model folder and the same streamed load (`bench.serve`) at each concurrency; all of them
stay up and take turns, level by level, for `--rounds` rounds; then the ratios of the medians are printed
(glm-serve on vLLM / llama.cpp against the raw server: what our front costs; against native: what the engine
buys). vLLM runs the dequantized float32 folder, llama.cpp the embedded Q4_1 GGUF itself:

    .venv/bin/python -m bench.engines --concurrency 1,16,32 --result-json bench/results/engines.json \\
        --plot bench/results/engines.png
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
NAME = "SmolLM2-135M-Instruct"
CPU_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def model_folder() -> str:
    sys.path.insert(0, str(REPO))
    from server.config import EMBEDDED_CHAT, Settings, resolve_model_path
    from server.model_files import model_folder as folder

    return folder(resolve_model_path(EMBEDDED_CHAT), Settings(_env_file=None).cache_dir)


def gguf_file() -> str:
    sys.path.insert(0, str(REPO))
    from server.config import EMBEDDED_CHAT, resolve_model_path

    return resolve_model_path(EMBEDDED_CHAT)


def commands(args, ports: dict[str, int], folder: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    def glm(label: str) -> list[str]:
        return [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(ports.get(label, 0))]

    common = {"DTYPE": "float32", "EMBEDDING_PATH": "none", "WEB_UI": "false", "LOG_LEVEL": "warning",
              "MAX_RUNNING_REQUESTS": str(args.max_running), "MAX_WAITING_REQUESTS": "256"}
    eager = ["--enforce-eager"] if args.enforce_eager else []
    raw = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name",
           NAME, "--dtype", "float32", "--max-num-seqs", str(args.max_running), "--host", "127.0.0.1",
           "--port", str(ports.get("vllm", 0)), *eager]
    return {
        "native": (glm("native"), {**common, "ENGINE": "native"}),
        "glm-serve+vllm": (glm("glm-serve+vllm"), {**common, **CPU_VLLM_ENV, "ENGINE": "vllm",
                                                   "VLLM_PYTHON": args.vllm_python, "VLLM_ARGS": " ".join(eager)}),
        "vllm": (raw, CPU_VLLM_ENV),
        "glm-serve+llamacpp": (glm("glm-serve+llamacpp"), {**common, "ENGINE": "llamacpp",
                                                           "LLAMA_SERVER": args.llama_server}),
        # llama.cpp's own server as glm-serve starts it (same slots, shared KV pool, context), on the same GGUF
        "llama-server": ([args.llama_server, "-m", gguf_file(), "--alias", NAME, "--host", "127.0.0.1", "--port",
                          str(ports.get("llama-server", 0)), "--parallel", str(args.max_running), "--cont-batching",
                          "--kv-unified", "--ctx-size", "8192", "--no-webui"], {}),
    }


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"not ready after {timeout:.0f} s")


def start(label: str, cmd: list[str], env: dict[str, str], args, port: int, logs: Path) -> subprocess.Popen:
    log = open(logs / f"{label}.log", "w")
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ready = wait_ready(f"http://127.0.0.1:{port}", proc, args.startup_timeout)
    print(f"{label}: ready in {ready:.0f} s on port {port}", flush=True)
    return proc


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def measure(label: str, port: int, level: int, prompts: int, rnd: int, args, out: Path) -> dict:
    load = os.getloadavg()[0]
    subprocess.run([sys.executable, "-m", "bench.serve", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", NAME,
                    "--max-concurrency", str(level), "--num-prompts", str(prompts), "--input-len",
                    str(args.input_len), "--output-len", str(args.output_len), "--temperature", str(args.temperature),
                    # new prompts for each round and level, the same for every server: a server that caches prompts
                    # (llama-server's slots, vLLM's prefix cache) must not find the last round's whole prompts again
                    "--seed", str(rnd * 1000 + level), "--label", label, "--result-json",
                    str(out), "--disable-tqdm"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    run = json.loads(out.read_text())[0]
    run.update(round=rnd, load_before=round(load, 2), load_after=round(os.getloadavg()[0], 2))
    m = run["metrics"]
    print(f"round {rnd} c={level:<3} {label:<15} {m['output_throughput']:7.1f} tok/s  TTFT p50 "
          f"{m['ttft_ms']['median'] / 1000:5.2f} s  (load {run['load_before']} -> {run['load_after']})", flush=True)
    return run


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def ratios(runs: list[dict]) -> str:
    """Medians over the rounds; a ratio is of two medians measured in the same rounds."""
    tps: dict[tuple[str, int], list[float]] = {}
    ttft: dict[tuple[str, int], list[float]] = {}
    for r in runs:
        key = (r["label"], r["config"]["max_concurrency"])
        tps.setdefault(key, []).append(r["metrics"]["output_throughput"])
        ttft.setdefault(key, []).append(r["metrics"]["ttft_ms"]["median"] / 1000)
    levels = sorted({c for _, c in tps})
    spreads: list[str] = []
    lines = ["| concurrency | native tok/s | glm-serve+vllm tok/s | vllm tok/s | front / raw vLLM "
             "| vLLM front / native | TTFT p50 native / front / raw |", "|---:|---:|---:|---:|---:|---:|---|"]
    for c in levels:
        keys = [(label, c) for label in ("native", "glm-serve+vllm", "vllm")]
        if not all(k in tps for k in keys):
            continue
        n, f, v = (median(tps[k]) for k in keys)
        spreads.append(f"c={c}: " + ", ".join(f"{k[0]} {min(tps[k]):.1f}–{max(tps[k]):.1f}" for k in keys))
        t = [median(ttft[k]) for k in keys]
        lines.append(f"| {c} | {n:.1f} | {f:.1f} | {v:.1f} | {f / v:.2f}x | {f / n:.2f}x | "
                     f"{t[0]:.2f} / {t[1]:.2f} / {t[2]:.2f} s |")
    lines += ["", "tok/s over the rounds, min–max: " + "; ".join(spreads), "",
              "| concurrency | native tok/s | glm-serve+llamacpp tok/s | llama-server tok/s | front / raw llama-server "
              "| llama.cpp front / native | TTFT p50 native / front / raw |", "|---:|---:|---:|---:|---:|---:|---|"]
    for c in levels:
        keys = [(label, c) for label in ("native", "glm-serve+llamacpp", "llama-server")]
        if not all(k in tps for k in keys):
            continue
        n, f, v = (median(tps[k]) for k in keys)
        t = [median(ttft[k]) for k in keys]
        lines.append(f"| {c} | {n:.1f} | {f:.1f} | {v:.1f} | {f / v:.2f}x | {f / n:.2f}x | "
                     f"{t[0]:.2f} / {t[1]:.2f} / {t[2]:.2f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,16,32")
    ap.add_argument("--num-prompts", default="8,32,64", help="per concurrency level")
    ap.add_argument("--input-len", type=int, default=100, help="words per prompt (~134 tokens with the template)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="of every request (0: greedy)")
    ap.add_argument("--rounds", type=int, default=2, help="each level is measured this often per server, interleaved")
    ap.add_argument("--max-running", type=int, default=32, help="MAX_RUNNING_REQUESTS / --max-num-seqs")
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                    help="let vLLM torch.compile (minutes of warm-up on a CPU)")
    ap.add_argument("--llama-server", default=str(REPO / "build" / "llama.cpp" / "bin" / "llama-server"),
                    help="llama.cpp's llama-server (.ci/llamacpp.sh builds it there)")
    ap.add_argument("--only", default="native,glm-serve+vllm,vllm,glm-serve+llamacpp,llama-server",
                    help="which of the five to run")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--port", type=int, default=6290, help="the first server's port; the others take the next ones")
    ap.add_argument("--result-json")
    ap.add_argument("--plot")
    args = ap.parse_args()

    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = [int(n) for n in args.num_prompts.split(",")]
    folder = model_folder()
    wanted = args.only.split(",")
    # All servers stay up and every level is measured on each in turn, the order rotating each round: noise on a
    # shared machine (another job, a thermal step) then falls on all of them alike, not on whichever ran last.
    ports = {label: args.port + i for i, label in enumerate(wanted)}
    runs: list[dict] = []
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for label, (cmd, env) in commands(args, ports, folder).items():
                if label in wanted:
                    procs.append(start(label, cmd, env, args, ports[label], Path(tmp)))
            for rnd in range(1, args.rounds + 1):
                order = wanted[rnd - 1 :] + wanted[: rnd - 1]
                for level, n in zip(levels, prompts):
                    for label in order:
                        runs.append(measure(label, ports[label], level, n, rnd, args, Path(tmp) / "run.json"))
        finally:
            for proc in procs:
                stop(proc)
    print()
    print(ratios(runs))
    if args.result_json:
        Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_json).write_text(json.dumps(runs, indent=2))
    if args.plot:
        from bench.plot import plot_runs

        plot_runs(runs, args.plot)


if __name__ == "__main__":
    main()
