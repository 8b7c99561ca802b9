"""Where and in what precision the model runs: device, dtype, device_map and quantization config."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from server.errors import ConfigError


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


def pick_dtype(requested: str, device: str, quantization: str = "none") -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        if quantization == "8bit":
            # LLM.int8 multiplies in float16: bf16 activations would be cast to fp16 and back in every layer.
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.bfloat16  # CPU: callers that know the model size use cpu_auto_dtype() instead


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_auto_dtype(fp32_weight_bytes: int | None, free_ram: int) -> str:
    """DTYPE=auto on CPU: bf16 where the CPU computes it natively; elsewhere float32 when it fits.

    Without avx512_bf16/AMX, torch emulates bf16 matmuls: measured on this project's AVX2 box, float32 decoded
    SmolLM2 faster than bf16. float32 doubles the memory, so a model whose float32 weights would take more than
    half of the free RAM (ChatGLM3-6B: 23 GiB) still gets bf16.
    """
    if cpu_has_native_bf16():
        return "bfloat16"
    if fp32_weight_bytes is not None and fp32_weight_bytes <= free_ram // 2:
        return "float32"
    return "bfloat16"


def quantization_config(mode: str, device: str, dtype: torch.dtype, double_quant: bool = True) -> Any:
    """BitsAndBytesConfig for QUANTIZATION=8bit|4bit; `dtype` is the compute dtype of 4-bit layers and the dtype of
    everything bitsandbytes leaves unquantized (embeddings, norms, lm_head). bitsandbytes >= 0.45 also runs on CPU."""
    if mode == "none":
        return None
    if device == "mps":
        raise ConfigError(f"QUANTIZATION={mode} uses bitsandbytes, which has no MPS backend. Use QUANTIZATION=none.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"QUANTIZATION={mode} needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
                          "(or use QUANTIZATION=none).")
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=double_quant,
    )


def place(device: str, dtype: str, quantization: str = "none", double_quant: bool = True, *,
          model_path: str | None = None) -> Placement:
    """Where and in what precision a model runs. `model_path` lets DTYPE=auto on CPU weigh the model's size."""
    dev = pick_device(device)
    if dtype == "auto" and dev == "cpu" and quantization == "none" and model_path is not None:
        dtype = cpu_auto_dtype(_fp32_weight_bytes(model_path), _free_ram())
    dt = pick_dtype(dtype, dev, quantization)
    if dev == "cuda" and torch.cuda.device_count() > 1:
        device_map: Any = "auto"  # accelerate balances the layers over every visible GPU
    else:
        device_map = {"": dev}
    return Placement(dev, dt, device_map, quantization_config(quantization, dev, dt, double_quant))


def _fp32_weight_bytes(model_path: str) -> int | None:
    from server.plan import PRECISIONS, read_shape, weight_bytes

    try:
        return weight_bytes(read_shape(model_path), PRECISIONS[0])
    except Exception:  # an unknown shape: the loader will say what is wrong; bf16 is the safe guess meanwhile
        return None


def _free_ram() -> int:
    from server.plan import ram_memory

    return ram_memory().free
