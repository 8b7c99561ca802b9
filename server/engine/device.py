"""Where and in what precision the model runs: device, dtype, device_map and quantization config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.engine.base import EngineError


class ConfigError(EngineError):
    """A setting combination that cannot work on this machine; the message says what to change."""


@dataclass
class Placement:
    device: str  # "cuda", "cuda:1", "mps", "cpu"
    dtype: torch.dtype
    device_map: Any  # passed to from_pretrained; "auto" splits over several GPUs
    quantization_config: Any = None

    @property
    def input_device(self) -> str:
        return "cuda:0" if self.device == "cuda" else self.device

    def describe(self) -> str:
        if self.device == "cuda" and self.device_map == "auto":
            n = torch.cuda.device_count()
            where = f"{n}x {torch.cuda.get_device_name(0)} (split by accelerate)" if n > 1 else "cuda:0"
        else:
            where = self.device
        return where


def pick_device(requested: str) -> str:
    requested = requested.strip().lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"DEVICE={requested} but this torch build sees no CUDA GPU. Use DEVICE=auto or cpu.")
        if ":" in requested and int(requested.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(
                f"DEVICE={requested} but only {torch.cuda.device_count()} CUDA device(s) exist (cuda:0..)."
            )
        return requested
    if requested == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ConfigError("DEVICE=mps but MPS is not available (needs Apple Silicon and a macOS torch build).")
        return "mps"
    if requested == "cpu":
        return "cpu"
    raise ConfigError(f"DEVICE={requested!r} is not one of auto, cuda, cuda:N, mps, cpu.")


def pick_dtype(requested: str, device: str) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    # On CPU bf16 halves the memory and measured faster than fp32 for decoding on this project's 2-core box.
    return torch.bfloat16


def quantization_config(mode: str, device: str, dtype: torch.dtype) -> Any:
    if mode == "none":
        return None
    if device == "mps":
        raise ConfigError(f"QUANTIZATION={mode} uses bitsandbytes, which has no MPS backend. Use QUANTIZATION=none.")
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - transformers always has it
        raise ConfigError("QUANTIZATION needs bitsandbytes: pip install bitsandbytes") from exc
    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
    )


def place(device: str, dtype: str, quantization: str = "none") -> Placement:
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if dev == "cuda" and torch.cuda.device_count() > 1:
        device_map: Any = "auto"  # accelerate balances the layers over every visible GPU
    else:
        device_map = {"": dev}
    return Placement(dev, dt, device_map, quantization_config(quantization, dev, dt))
