"""Plot `bench.serve` results: output tokens/s and median TTFT against concurrency, one line per label.

python -m bench.plot bench/results/glm.json bench/results/tserve.json --out bench/results/compare.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def load_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs.extend(data if isinstance(data, list) else [data])
    return runs


def plot_runs(runs: Sequence[dict[str, Any]], out: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, float]]] = {}
    for run in runs:
        label = str(run.get("label") or run["config"].get("base_url", "run"))
        m = run["metrics"]
        series.setdefault(label, []).append(
            (int(run["config"]["max_concurrency"]), m["output_throughput"], m["ttft_ms"]["median"])
        )

    fig, (ax_tp, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    concurrencies: set[int] = set()
    for label, points in series.items():
        # a label run twice at one concurrency: keep the last one
        by_c = {c: (tp, ttft) for c, tp, ttft in points}
        xs = sorted(by_c)
        concurrencies.update(xs)
        ax_tp.plot(xs, [by_c[c][0] for c in xs], marker="o", label=label)
        ax_ttft.plot(xs, [by_c[c][1] for c in xs], marker="o", label=label)
    for ax, ylabel in ((ax_tp, "output tokens/s"), (ax_ttft, "median TTFT (ms)")):
        ax.set_xlabel("max concurrency")
        ax.set_ylabel(ylabel)
        if len(concurrencies) > 1 and max(concurrencies) / max(1, min(concurrencies)) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(concurrencies))
        ax.set_xticklabels([str(c) for c in sorted(concurrencies)])
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend()
    ax_tp.set_title("Output throughput")
    ax_ttft.set_title("Time to first token")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="--result-json files written by bench.serve")
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    print(plot_runs(load_runs(args.results), args.out, args.title))


if __name__ == "__main__":
    main()
