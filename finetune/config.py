"""Every setting of a fine-tuning run, in one dataclass: the flags, the YAML keys and the saved config are its fields.

Precedence: defaults < `--config FILE.yaml` < flags given on the command line. On `--resume` the run's saved
config (DIR/finetune_config.yaml) takes the place of the defaults and the YAML, and only the settings that do not
change what has been trained so far (RESUMABLE) may differ on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "finetune_config.yaml"
FORMATS = ("auto", "alpaca", "chatglm3", "openai")
METHODS = ("lora", "qlora")
SCHEDULERS = ("linear", "cosine", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SWITCH = ("auto", "on", "off")
OVERLONG = ("truncate", "drop")
# Settings that may change when a run is resumed: how long it goes on, how often it saves, where it is printed.
# The data may move (its contents are checked by hash instead).
RESUMABLE = {"max_steps", "epochs", "save_steps", "resume", "plan", "config", "name", "data", "eval_data", "threads"}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, flag: str | None = None, **kw):
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, **kw})


@dataclass
class FinetuneConfig:
    data: str = _f("", "training data: JSON or JSONL (Alpaca, ChatGLM3 conversations or OpenAI messages)",
                   positional=True)
    model: str = _f("", "base model: hub id, local / ModelScope folder or .gguf (default: MODEL_PATH, as the "
                    "server reads it)")
    out: str = _f("", "output folder for the adapter, its checkpoints, logs and loss curve")
    config: str = _f("", "YAML file with any of these settings (keys as the flags, - or _)")
    format: str = _f("auto", "data format (auto: detected from the rows)", FORMATS)
    method: str = _f("lora", "lora: 16/32-bit base; qlora: bitsandbytes 4-bit nf4 base", METHODS)
    epochs: int = _f(3, "passes over the training rows (when --max-steps is 0)")
    max_steps: int = _f(0, "optimizer steps to train (0: --epochs worth)")
    learning_rate: float = _f(3e-4, "peak learning rate (THUDM's lora.yaml: 3e-4)", flag="--learning-rate")
    lr_scheduler: str = _f("linear", "learning-rate decay after warmup", SCHEDULERS)
    warmup_steps: int = _f(0, "steps of linear warmup from 0 to the learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping (0: off)")
    batch_size: int = _f(4, "rows per forward pass")
    gradient_accumulation: int = _f(1, "forward passes per optimizer step (effective batch = batch_size x this)")
    lora_rank: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(32.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _f(0.1, "dropout on the LoRA input")
    target_modules: str = _f("", "modules to adapt, comma-separated, or all-linear (default per family: ChatGLM3 "
                             "query_key_value,dense,dense_h_to_4h,dense_4h_to_h; others all-linear)")
    max_length: int = _f(1024, "longest example in tokens")
    overlong: str = _f("truncate", "rows longer than --max-length: truncate (keep the first max-length tokens) or "
                       "drop; a row left without a trained token is dropped either way", OVERLONG)
    eval_split: float = _f(0.05, "fraction of rows held out for eval loss (0: none; fewer than 1 row: none)")
    eval_data: str = _f("", "a separate eval file (instead of --eval-split)")
    save_steps: int = _f(200, "save a resumable checkpoint every N steps (and always at the end)")
    resume: bool = _f(False, "continue the run in --out from its last checkpoint")
    seed: int = _f(42, "seed for LoRA init, data order, the eval split and dropout")
    device: str = _f("auto", "auto (cuda > mps > cpu), cuda, cuda:N, mps, cpu")
    dtype: str = _f("auto", "base weights / compute dtype (auto: bf16 on GPUs that have it, else fp16; "
                    "CPU: float32 when it fits in half the free RAM, else bf16)", DTYPES)
    quant_double: bool = _f(True, "qlora: double quantization of the 4-bit scales")
    threads: int = _f(0, "CPU threads for torch (0: its default, one per core); on a CPU busy with other work 1 can "
                      "be several times faster")
    gradient_checkpointing: str = _f("auto", "recompute activations in backward (less memory, ~30% slower; "
                                     "auto: on for GPUs)", SWITCH)
    name: str = _f("", "served model id of the adapter in the printed serve command (default: --out's name)")
    cache_dir: str = _f("", "where converted GGUF copies live (default: CACHE_DIR, as the server)")
    plan: bool = _f(False, "print the memory it needs against this machine's GPUs and RAM, then exit")

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation

    def check(self) -> FinetuneConfig:
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{_flag(f)} must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}")
        positive = ("epochs", "batch_size", "gradient_accumulation", "lora_rank", "max_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_steps", "warmup_steps", "threads", "save_steps", "weight_decay", "max_grad_norm",
                     "learning_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
        if not 0 <= self.eval_split < 1:
            raise ConfigError("--eval-split is a fraction in [0, 1)")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("--lora-dropout is a probability in [0, 1)")
        if not self.plan and not self.data:
            raise ConfigError("give the training data file (python -m finetune DATA --out DIR)")
        if not self.plan and not self.out:
            raise ConfigError("give --out DIR, the folder the adapter is written to")
        return self

    def to_yaml(self) -> str:
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("resume", "plan", "config")}
        return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_names() -> dict[str, Any]:
    return {f.name: f for f in fields(FinetuneConfig)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML mapping; unknown keys are an error naming them (a typo must not be ignored)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of settings (key: value), not {type(raw).__name__}")
    known = field_names()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name == "lr":
            name = "learning_rate"
        if name not in known or name == "config":
            raise ConfigError(f"{path}: unknown setting {key!r} (python -m finetune --help lists them)")
        out[name] = _coerce(known[name], value, f"{path}: {key}")
    return out


def _coerce(f, value: Any, where: str) -> Any:
    kind = type(f.default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return str(value).lower() in ("true", "yes", "on", "1")
            raise ValueError(value)
        if kind is str and isinstance(value, list):  # target_modules: [a, b] in YAML
            return ",".join(str(v) for v in value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a {kind.__name__}") from None


def build(explicit: dict[str, Any]) -> FinetuneConfig:
    """The run's config from explicitly given values (flags) and the --config file they may name."""
    values: dict[str, Any] = {}
    if explicit.get("config"):
        values.update(read_yaml(explicit["config"]))
    values.update(explicit)
    if values.get("resume") and values.get("out"):
        saved = Path(values["out"]) / CONFIG_FILE
        if not saved.is_file():
            raise ConfigError(f"--resume: {saved} does not exist; {values['out']} holds no run to resume")
        previous = read_yaml(saved)
        changed = sorted(k for k, v in values.items() if k not in RESUMABLE and k in previous and previous[k] != v)
        if changed:
            raise ConfigError("--resume continues the saved run; these settings differ from it: " + ", ".join(
                f"{k} ({previous[k]!r} -> {values[k]!r})" for k in changed))
        values = {**previous, **values}
    return FinetuneConfig(**values).check()
