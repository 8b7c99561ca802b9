"""Fine-tuning speed: training tokens per second of `python -m finetune` on this machine.

Synthetic Alpaca rows of about --tokens tokens each are trained for --steps optimizer steps with the tool's own
code (run in-process); the figure is the median over steps of (tokens in the step) / (step time), the first step
(warm-up) left out. Memory: peak resident set of the process.

    .venv/bin/python -m bench.finetune_speed --model embedded --method lora --steps 6
    .venv/bin/python -m bench.finetune_speed --model /tmp/glm-serve-tests/tiny-llama-v1 --method qlora
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
from pathlib import Path

TEXT = ("A lighthouse keeper walks up the stairs every evening, trims the wick, cleans the lens and writes the "
        "weather in the log. Ships pass far out at sea and never know his name. ")


def rows(n: int, tokens: int) -> list[dict]:
    words = TEXT.split()
    answer = " ".join(words[i % len(words)] for i in range(int(tokens * 0.6)))
    return [{"instruction": f"Story {i}: tell me about the lighthouse.", "input": "", "output": answer}
            for i in range(n)]


def main() -> None:
    import torch

    from finetune.cli import config_from_argv
    from finetune.run import run

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded", help="model path, or 'embedded' for SmolLM2-135M (the default)")
    p.add_argument("--method", default="lora", choices=["lora", "qlora"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256, help="about this many tokens per row")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--extra", default="", help="more finetune flags, space-separated")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.json"
        data.write_text(json.dumps(rows(args.batch_size * args.steps, args.tokens)))
        flags = [str(data), "--out", str(Path(tmp) / "out"), "--method", args.method, "--max-steps",
                 str(args.steps), "--batch-size", str(args.batch_size), "--eval-split", "0", "--save-steps", "0",
                 *args.extra.split()]
        if args.model != "embedded":
            flags += ["--model", args.model]
        result = run(config_from_argv(flags))
        log = [json.loads(line) for line in (result.out / "loss_log.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in log if "tokens_per_s" in r][1:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    s = result.summary
    print(json.dumps({"model": s["data"]["model"], "method": args.method, "threads": torch.get_num_threads(),
                      "batch": args.batch_size, "tokens_per_row": round(s["tokens"] / max(s["steps"], 1) /
                                                                        args.batch_size),
                      "tokens_per_s_median": round(statistics.median(rates), 1) if rates else None,
                      "tokens_per_s_all": [round(r) for r in rates], "first_loss": s["first_loss"],
                      "last_loss": s["last_loss"], "peak_rss_gib": round(peak, 2)}))


if __name__ == "__main__":
    main()
