"""Side by side in one run: glm-serve's native engine, glm-serve on vLLM, and vLLM's own OpenAI server.

Each server gets the same model folder, the same streamed load (`bench.serve`) at each concurrency, one after the
other on an otherwise idle machine; then the ratios are printed (glm-serve on vLLM against raw vLLM: what our
front costs; against native: what vLLM buys):

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


def commands(args, port: int, folder: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    glm = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port)]
    common = {"DTYPE": "float32", "EMBEDDING_PATH": "none", "WEB_UI": "false", "LOG_LEVEL": "warning",
              "MAX_RUNNING_REQUESTS": str(args.max_running), "MAX_WAITING_REQUESTS": "256"}
    eager = ["--enforce-eager"] if args.enforce_eager else []
    raw = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--served-model-name",
           NAME, "--dtype", "float32", "--max-num-seqs", str(args.max_running), "--host", "127.0.0.1",
           "--port", str(port), *eager]
    return {
        "native": (glm, {**common, "ENGINE": "native"}),
        "glm-serve+vllm": (glm, {**common, **CPU_VLLM_ENV, "ENGINE": "vllm", "VLLM_PYTHON": args.vllm_python,
                                 "VLLM_ARGS": " ".join(eager)}),
        "vllm": (raw, CPU_VLLM_ENV),
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


def run_one(label: str, cmd: list[str], env: dict[str, str], args, port: int, out: Path) -> list[dict]:
    log = open(out.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(url, proc, args.startup_timeout)
        print(f"{label}: ready in {ready:.0f} s", flush=True)
        subprocess.run([sys.executable, "-m", "bench.serve", "--base-url", url + "/v1", "--model", NAME,
                        "--max-concurrency", args.concurrency, "--num-prompts", args.num_prompts,
                        "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--label", label,
                        "--result-json", str(out), "--disable-tqdm"], cwd=REPO, check=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    runs = json.loads(out.read_text())
    for run in runs:
        run["startup_s"] = ready
    return runs


def ratios(runs: list[dict]) -> str:
    by = {(r["label"], r["config"]["max_concurrency"]): r["metrics"] for r in runs}
    levels = sorted({c for _, c in by})
    lines = ["| concurrency | native tok/s | glm-serve+vllm tok/s | vllm tok/s | front / raw vLLM "
             "| vLLM front / native | TTFT p50 native / front / raw |", "|---:|---:|---:|---:|---:|---:|---|"]
    for c in levels:
        n, f, v = (by.get((label, c)) for label in ("native", "glm-serve+vllm", "vllm"))
        if not (n and f and v):
            continue
        t = [m["ttft_ms"]["median"] / 1000 for m in (n, f, v)]
        lines.append(f"| {c} | {n['output_throughput']:.1f} | {f['output_throughput']:.1f} | "
                     f"{v['output_throughput']:.1f} | {f['output_throughput'] / v['output_throughput']:.2f}x | "
                     f"{f['output_throughput'] / n['output_throughput']:.2f}x | "
                     f"{t[0]:.2f} / {t[1]:.2f} / {t[2]:.2f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,16,32")
    ap.add_argument("--num-prompts", default="8,32,64", help="per concurrency level")
    ap.add_argument("--input-len", type=int, default=100, help="words per prompt (~134 tokens with the template)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-running", type=int, default=32, help="MAX_RUNNING_REQUESTS / --max-num-seqs")
    ap.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                    help="let vLLM torch.compile (minutes of warm-up on a CPU)")
    ap.add_argument("--only", default="native,glm-serve+vllm,vllm", help="which of the three to run")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--port", type=int, default=6290)
    ap.add_argument("--result-json")
    ap.add_argument("--plot")
    args = ap.parse_args()

    folder = model_folder()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (cmd, env) in commands(args, args.port, folder).items():
            if label in args.only.split(","):
                runs += run_one(label, cmd, env, args, args.port, Path(tmp) / f"{label}.json")
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
