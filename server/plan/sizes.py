"""Bytes of a model's weights in each precision (bitsandbytes layouts included), estimated and measured."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from server.plan.shape import ModelShape, PlanError, shape_from_config

log = logging.getLogger("glm_serve.plan")

@dataclass(frozen=True)
class Precision:
    label: str
    quantization: str  # none | 8bit | 4bit
    dtype_bytes: int  # of everything left unquantized, of 4-bit compute, and of the KV cache
    double_quant: bool = False


PRECISIONS = [
    Precision("fp32", "none", 4),
    Precision("bf16/fp16", "none", 2),
    Precision("8bit", "8bit", 2),
    Precision("4bit nf4", "4bit", 2),
    Precision("4bit nf4+dq", "4bit", 2, double_quant=True),
]


def linear_bytes(out: int, inp: int, p: Precision) -> int:
    n = out * inp
    if p.quantization == "8bit":
        return n + 4 * out  # int8 weight + float32 row scale (SCB)
    if p.quantization == "4bit":
        blocks = math.ceil(n / 64)
        scales = blocks + 4 * math.ceil(blocks / 256) if p.double_quant else 4 * blocks
        return math.ceil(n / 2) + scales + 4 * 16  # packed nf4 + absmax + the 16-value nf4 code
    return n * p.dtype_bytes


def weight_bytes(shape: ModelShape, p: Precision) -> int:
    linear = shape.layers * sum(linear_bytes(o, i, p) for o, i, _ in shape.matrices())
    shared_code = 4 * 256 if p.quantization == "4bit" and p.double_quant else 0  # one second-level code, shared
    return linear + (shape.embedding_params + shape.small_params) * p.dtype_bytes + shared_code


def precision_of(quantization: str, dtype_bytes: int, double_quant: bool) -> Precision:
    for p in PRECISIONS:
        if (p.quantization, p.dtype_bytes) == (quantization, dtype_bytes) and (
                quantization != "4bit" or p.double_quant == double_quant):
            return p
    label = {"none": "fp32" if dtype_bytes == 4 else "16-bit"}.get(quantization, quantization)
    dq = "+dq" if quantization == "4bit" and double_quant else ""
    suffix = ", fp32 rest" if quantization != "none" and dtype_bytes == 4 else ""
    return Precision(f"{label}{dq}{suffix}", quantization, dtype_bytes, double_quant)


def measured_weight_bytes(model) -> int:
    """What the loaded weights occupy: parameters and buffers, plus the bitsandbytes scales that live outside them
    (`get_memory_footprint` misses the 4-bit quant_state and 8-bit SCB). Shared storage is counted once."""
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes

    for t in (*model.parameters(), *model.buffers()):
        add(t)
        add(getattr(t, "SCB", None))
        qs = getattr(t, "quant_state", None)
        if qs is not None:  # the attributes themselves: QuantState.as_dict() hands out a clone of one of them
            for value in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                add(value)
            if getattr(qs, "state2", None) is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    for module in model.modules():  # after its first forward, Linear8bitLt keeps the row scales in .state
        add(getattr(getattr(module, "state", None), "SCB", None))
    return total



def estimate_loaded(config: dict[str, Any], placement) -> int | None:
    """The estimate for what the loader just loaded (None if the config cannot be planned)."""
    try:
        shape = shape_from_config(config)
    except (PlanError, KeyError, TypeError, ValueError) as exc:
        log.debug("no weight estimate: %s", exc)
        return None
    qc = placement.quantization_config
    if qc is None:
        quantization, dq = "none", False
    elif getattr(qc, "load_in_8bit", False):
        quantization, dq = "8bit", False
    else:
        quantization, dq = "4bit", bool(getattr(qc, "bnb_4bit_use_double_quant", False))
    return weight_bytes(shape, precision_of(quantization, placement.dtype.itemsize, dq))

