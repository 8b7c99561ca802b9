"""One fine-tuning run, in the order that keeps a failed start from leaving anything behind.

Checks first (the output folder, matplotlib), then every data row, then the model and the rendering of every
row through its family; DIR is created only once all of that passed. Then train, write the adapter, summarize.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import checkpoint, data
from finetune.config import CONFIG_FILE, ConfigError, FinetuneConfig
from finetune.render import render_all

DATA_SUMMARY = "data_summary.json"
SUMMARY = "summary.json"


@dataclass
class Result:
    out: Path
    summary: dict
    text: str


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_out(cfg: FinetuneConfig) -> Path:
    out = Path(cfg.out)
    if cfg.resume:
        if checkpoint.latest(out) is None:
            raise ConfigError(f"--resume: {out} has no complete checkpoint yet; start the run again without --resume "
                              "(after removing the folder)")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not empty: give a new folder, or add --resume to continue its run "
                          "(nothing was written)")
    return out


def _split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random hold-out of floor(fraction * n) rows (none if that is 0)."""
    n_eval = math.floor(len(examples) * fraction)
    if n_eval == 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def prepare(cfg: FinetuneConfig):
    """Everything before training: (out, model, train examples, eval examples, data summary)."""
    from finetune.model import load, model_path

    out = _check_out(cfg)
    try:
        import matplotlib  # noqa: F401  (the loss curve needs it; fail now, not after hours of training)
    except ImportError:
        raise ConfigError("the loss curve needs matplotlib: pip install 'glm-serve[finetune]'") from None
    fmt, conversations = data.load(cfg.data, cfg.format)
    eval_conversations = data.load(cfg.eval_data, cfg.format)[1] if cfg.eval_data else []
    path = model_path(cfg)
    tm = load(cfg, path)
    examples, stats = render_all(conversations, tm.family, cfg.max_length, cfg.overlong)
    if not examples:
        raise data.DataError(f"{cfg.data}: no row is left to train on ({stats.dropped} dropped as longer than "
                             f"--max-length {cfg.max_length})")
    if eval_conversations:
        train, evals = examples, render_all(eval_conversations, tm.family, cfg.max_length, cfg.overlong)[0]
    else:
        train, evals = _split(examples, cfg.eval_split, cfg.seed)
    summary = {"file": str(cfg.data), "sha256": _sha256(cfg.data), "format": fmt, **stats.as_dict(),
               "train_examples": len(train), "eval_examples": len(evals), "max_length": cfg.max_length,
               "overlong": cfg.overlong, "family": tm.family.name, "model": cfg.model or path}
    if cfg.resume:
        saved = json.loads((out / DATA_SUMMARY).read_text(encoding="utf-8"))
        if saved["sha256"] != summary["sha256"]:
            raise ConfigError(f"--resume: {cfg.data} is not the file this run was trained on (its contents changed)")
    return out, tm, train, evals, summary


def run(cfg: FinetuneConfig, on_step=None) -> Result:
    from finetune.export import write_adapter
    from finetune.loop import Trainer

    started = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, tm, train, evals, data_summary = prepare(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
    (out / DATA_SUMMARY).write_text(json.dumps(data_summary, indent=2, ensure_ascii=False), encoding="utf-8")
    trainer = Trainer(cfg, tm, train, evals, out)
    resumed_from = None
    if cfg.resume:
        resumed_from = checkpoint.latest(out)
        trainer.resume(resumed_from)
    trainer.run(on_step)
    written = write_adapter(tm.model, out, tm.chatglm3)
    curve = trainer.log.plot(f"{out.name}: {cfg.method}, r={cfg.lora_rank}")
    summary = _summary(cfg, out, data_summary, trainer, written, curve, resumed_from, time.monotonic() - started)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return Result(out, summary, format_summary(summary))


def serve_command(cfg: FinetuneConfig, out: Path) -> str:
    name = cfg.name or out.resolve().name
    env = []
    if cfg.model or os.environ.get("MODEL_PATH"):
        env.append(f"MODEL_PATH={shlex.quote(cfg.model or os.environ['MODEL_PATH'])}")
    if cfg.method == "qlora":
        env.append("QUANTIZATION=4bit")  # the base it was trained against; the adapter also fits the full base
    env.append(f"LORA_MODULES={shlex.quote(f'{name}={out.resolve()}')}")
    return " ".join(env) + " python -m server"


def _summary(cfg, out, data_summary, trainer, written, curve, resumed_from, wall) -> dict:
    losses, evals = trainer.log.train_losses(), trainer.log.eval_losses()
    state = trainer.state
    return {
        "data": data_summary,
        "method": cfg.method, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
        "targets": trainer.tm.targets, "steps": trainer.step, "epochs": round(trainer.step /
                                                                             trainer.schedule.steps_per_epoch, 3),
        "tokens": state["tokens"], "trained_tokens": state["trained_tokens"],
        "train_seconds": round(state["elapsed_s"], 2), "wall_seconds": round(wall, 2),
        "tokens_per_s": round(state["tokens"] / state["elapsed_s"], 1) if state["elapsed_s"] else None,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "adapter": str(written["adapter"]), "vllm_adapter": str(written["vllm"]) if "vllm" in written else None,
        "loss_curve": str(curve), "resumed_from": str(resumed_from) if resumed_from else None,
        "serve": serve_command(cfg, out),
        "merge": f"python -m server.merge {shlex.quote(cfg.model or data_summary['model'])} {shlex.quote(str(out))} "
                 f"{shlex.quote(str(out) + '-merged')}",
    }


def format_summary(s: dict) -> str:
    d = s["data"]
    lines = [
        f"Fine-tuned {d['model']} with {s['method'].upper()} (r={s['lora_rank']}, alpha={s['lora_alpha']:g}) "
        f"in {s['wall_seconds']:.0f} s",
        f"  data      {d['file']} ({d['format']}): {d['rows']} rows -> {d['train_examples']} train / "
        f"{d['eval_examples']} eval examples; {d['truncated']} truncated, {d['dropped']} dropped "
        f"(max-length {d['max_length']})",
        f"  trained   {s['steps']} steps ({s['epochs']:g} epochs), {s['tokens']:,} tokens ({s['trained_tokens']:,} "
        f"assistant targets), {s['train_seconds']:.1f} s at {s['tokens_per_s'] or 0:,.0f} tokens/s",
    ]
    if s["first_loss"] is not None:
        eval_part = f", eval loss {s['eval_loss']:.4f}" if s["eval_loss"] is not None else ""
        lines.append(f"  loss      {s['first_loss']:.4f} (first step) -> {s['last_loss']:.4f} (last){eval_part}")
    lines.append(f"  adapter   {s['adapter']}" + (f"  (vLLM / THUDM layout: {s['vllm_adapter']})"
                                                  if s["vllm_adapter"] else ""))
    lines.append(f"  curve     {s['loss_curve']}")
    lines.append(f"  serve it  {s['serve']}")
    lines.append(f"  merge it  {s['merge']}")
    return "\n".join(lines)
