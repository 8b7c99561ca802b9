"""The training loop: AdamW on the LoRA weights, gradient accumulation, clipping, eval loss, checkpoints.

Written out rather than handed to transformers' Trainer because what this tool promises is easiest to keep in a
page of plain code: a resumed run must take exactly the steps of an uninterrupted one (the data order is a pure
function of seed and step, and every piece of state is in the checkpoint), the loss is the mean over the
assistant tokens of the whole accumulated step (each micro-batch's summed loss divided by the step's token
count, `num_items_in_batch`), and the bar shows tokens/s, which Trainer does not.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import checkpoint
from finetune.config import FinetuneConfig
from finetune.progress import Bar, LossLog
from finetune.render import IGNORE_INDEX, Example


@dataclass
class Schedule:
    """Which examples each optimizer step sees: epoch e is a permutation seeded by seed + e, cut into micro-batches
    of batch_size; a step takes gradient_accumulation of them (the last step of an epoch may take fewer)."""

    n_train: int
    batch_size: int
    accumulation: int
    seed: int
    total_steps: int = 0

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_per_epoch / self.accumulation)

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        last = min((k + 1) * self.accumulation, self.micro_per_epoch)
        return [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(k * self.accumulation, last)]

    def ends_epoch(self, step: int) -> bool:
        return (step + 1) % self.steps_per_epoch == 0


def schedule_for(cfg: FinetuneConfig, n_train: int) -> Schedule:
    s = Schedule(n_train, cfg.batch_size, cfg.gradient_accumulation, cfg.seed)
    s.total_steps = cfg.max_steps or cfg.epochs * s.steps_per_epoch
    return s


def collate(examples: list[Example], device: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and loss."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _targets(examples: list[Example]) -> int:
    # transformers shifts the labels: label 0 is never predicted.
    return sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples)


class Trainer:
    def __init__(self, cfg: FinetuneConfig, tm, train: list[Example], evals: list[Example], out: Path):
        from transformers import get_scheduler

        self.cfg, self.tm, self.train_set, self.eval_set, self.out = cfg, tm, train, evals, out
        self.schedule = schedule_for(cfg, len(train))
        self.params = [p for p in tm.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=self.schedule.total_steps)
        pad = getattr(tm.family.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else 0)
        # fp16 weights need autocast + loss scaling to train without overflow; bf16 and fp32 need neither.
        self.fp16 = tm.dtype == torch.float16 and tm.device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda") if self.fp16 else None
        self.log = LossLog(out)
        self.state = {"tokens": 0, "trained_tokens": 0, "elapsed_s": 0.0}
        self.step = 0

    def resume(self, path: Path) -> None:
        state = checkpoint.restore(path, self.tm.model, self.optimizer, self.scheduler)
        self.step = state.pop("step")
        self.state.update(state)
        self.log.resume(self.step)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.fp16 else contextlib.nullcontext()

    def train_step(self) -> tuple[float, int]:
        micro = [[self.train_set[i] for i in mb] for mb in self.schedule.micro_batches(self.step)]
        n_targets = sum(_targets(mb) for mb in micro)
        loss_sum, tokens = 0.0, 0
        for examples in micro:
            batch = collate(examples, self.tm.device, self.pad_id)
            with self._autocast():
                loss = self.tm.model(**batch, num_items_in_batch=n_targets).loss
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["trained_tokens"] += n_targets
        return loss_sum, tokens

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_set:
            return None
        self.tm.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(self.eval_set), self.cfg.batch_size):
            examples = self.eval_set[i:i + self.cfg.batch_size]
            n = _targets(examples)
            with self._autocast():
                loss = self.tm.model(**collate(examples, self.tm.device, self.pad_id), num_items_in_batch=n).loss
            total, count = total + float(loss) * n, count + n
        self.tm.model.train()
        return total / max(count, 1)

    def run(self, on_step: Callable[[int], None] | None = None) -> None:
        """Train from self.step to the end; `on_step(step)` after each step (tests stop a run there)."""
        total = self.schedule.total_steps
        bar = Bar(total, self.step)
        self.tm.model.train()
        try:
            while self.step < total:
                lr = self.scheduler.get_last_lr()[0]
                started = time.monotonic()
                loss, tokens = self.train_step()
                took = time.monotonic() - started
                self.step += 1
                self.state["tokens"] += tokens
                self.state["elapsed_s"] += took
                epoch = self.step / self.schedule.steps_per_epoch
                self.log.add({"step": self.step, "epoch": round(epoch, 4), "loss": loss, "lr": lr, "tokens": tokens,
                              "tokens_per_s": tokens / took, "elapsed_s": round(self.state["elapsed_s"], 3)})
                bar.step(loss, lr, tokens / took)
                if self.schedule.ends_epoch(self.step - 1) or self.step == total:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        self.log.add({"step": self.step, "epoch": round(epoch, 4), "eval_loss": eval_loss})
                        bar.write(f"epoch {epoch:.2f} (step {self.step}): eval loss {eval_loss:.4f}")
                if self.step == total or (self.cfg.save_steps and self.step % self.cfg.save_steps == 0):
                    checkpoint.save(self.out, self.step, self.tm.model, self.optimizer, self.scheduler, self.state)
                    self.log.plot(f"{Path(self.cfg.out).name}: {self.cfg.method}, r={self.cfg.lora_rank}")
                if on_step is not None:
                    on_step(self.step)
        finally:
            bar.close()
