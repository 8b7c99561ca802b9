"""Resumable checkpoints: DIR/checkpoints/step-NNNNNN holds everything the next step depends on.

That is the adapter weights (peft's save_pretrained), the AdamW moments, the learning-rate schedule, the random
generators (LoRA dropout draws from them) and the counters. The data order is not stored: it is a function of
the seed and the step (loop.Schedule). So a resumed run takes the same steps on the same batches with the same
optimizer state as one that never stopped. A checkpoint is written to a temporary folder and renamed, so a run
killed while saving leaves the previous checkpoint as the last complete one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


def save(out: Path, step: int, model, optimizer, scheduler, state: dict) -> Path:
    root = out / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, save_embedding_layers=False)  # LoRA weights only: the vocabulary is never resized
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest(out: Path) -> Path | None:
    root = out / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def restore(path: Path, model, optimizer, scheduler) -> dict:
    """Load a checkpoint into a freshly built model/optimizer/scheduler; returns its counters."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ValueError(f"{path} does not fit this model ({len(result.unexpected_keys)} unexpected weights)")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)  # our own file: RNG states are plain tensors
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
