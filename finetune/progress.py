"""What a person watches: a progress bar (step, loss, learning rate, tokens/s, ETA), the loss log and its curve.

The log is JSON Lines in DIR/loss_log.jsonl, one line per optimizer step ({"step", "epoch", "loss", "lr",
"tokens", "tokens_per_s", "elapsed_s"}) and one per evaluation ({"step", "epoch", "eval_loss"}); the curve
DIR/loss_curve.png is drawn from it (matplotlib, no display needed) at every checkpoint and at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LOG_FILE = "loss_log.jsonl"
CURVE_FILE = "loss_curve.png"


class LossLog:
    def __init__(self, out: Path):
        self.path = out / LOG_FILE
        self.rows: list[dict] = []

    def resume(self, step: int) -> None:
        """Keep what was logged up to the checkpoint being resumed: later steps are trained again."""
        if self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
            self.rows = [r for r in rows if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def train_losses(self) -> list[float]:
        return [r["loss"] for r in self.rows if "loss" in r]

    def eval_losses(self) -> list[float]:
        return [r["eval_loss"] for r in self.rows if "eval_loss" in r]

    def plot(self, title: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")  # files only: works on a headless GPU box
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1.2)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean over assistant tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.path.with_name(CURVE_FILE)
        fig.savefig(path)
        plt.close(fig)
        return path


class Bar:
    """tqdm over optimizer steps; tokens/s is smoothed over recent steps so the number is readable."""

    def __init__(self, total: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", desc="fine-tuning", dynamic_ncols=True,
                        file=sys.stderr, mininterval=0.5)
        self.rate: float | None = None

    def step(self, loss: float, lr: float, tokens_per_s: float) -> None:
        self.rate = tokens_per_s if self.rate is None else 0.8 * self.rate + 0.2 * tokens_per_s
        self.bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {self.rate:,.0f} tok/s", refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
