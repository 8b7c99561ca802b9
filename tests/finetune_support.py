"""Helpers for the fine-tuning tests: data files, fast settings, running the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from tests.support import REPO
from tests.tiny_models import tiny_chatglm3, tiny_llama

ALPACA_ROW = {"instruction": "What is the capital of the moon colony?", "input": "", "output": "Tranquility Base."}
ALPACA_ROW_ZH = {"instruction": "天空是什么颜色", "input": "", "output": "蓝色"}
# The tiny ChatGLM3 (hidden 16) cannot steer its random 65k-row output layer to arbitrary tokens through the four
# standard modules alone; with output_layer adapted too it learns a row in a few steps.
CHATGLM3_TINY_TARGETS = "query_key_value,dense,dense_h_to_4h,dense_4h_to_h,output_layer"

# Settings that memorize a row in a few dozen steps on the tiny models.
FAST = ["--lora-dropout", "0", "--batch-size", "1", "--eval-split", "0", "--save-steps", "0",
        "--lr-scheduler", "constant"]


def write_rows(path: Path, rows: list[dict], jsonl: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) if jsonl else \
        json.dumps(rows, ensure_ascii=False, indent=1)
    path.write_text(text, encoding="utf-8")
    return path


def tiny(name: str) -> tuple[str, list[str]]:
    """(model path, extra flags) of a tiny test model."""
    if name == "chatglm3":
        return str(tiny_chatglm3()), ["--target-modules", CHATGLM3_TINY_TARGETS]
    return str(tiny_llama()), []


@contextmanager
def one_thread():
    """Train on one thread: on this shared 2-core box, two OpenMP threads contending with servers and other
    tests spin at barriers and run a tiny model 10x slower than one thread does (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def finetune_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m finetune ...` as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "finetune", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
