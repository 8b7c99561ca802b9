"""The plan itself: what each precision needs (weights + KV cache) against this machine, and its table."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from server.errors import EngineError
from server.plan.machine import Memory, machine_memory
from server.plan.shape import RUNTIME_RESERVE, VERIFIED, GiB, ModelShape, read_shape
from server.plan.sizes import PRECISIONS, Precision, precision_of, weight_bytes


@dataclass
class Row:
    precision: Precision
    weights: int
    kv_token: int
    kv_one: int  # one full-context sequence
    kv_batch: int  # MAX_RUNNING_REQUESTS full-context sequences
    activations: int
    verdict: str = ""
    current: bool = False

    @property
    def total(self) -> int:
        return self.weights + self.kv_batch + self.activations


@dataclass
class Plan:
    source: str
    shape: ModelShape
    context: int
    batch: int
    gpus: list[Memory]
    ram: Memory
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def make_plan(shape: ModelShape, *, source: str, context: int = 0, batch: int = 16, quantization: str = "none",
              dtype_bytes: int = 2, double_quant: bool = True, device: str = "auto",
              memory: tuple[list[Memory], Memory] | None = None) -> Plan:
    ctx = min(context, shape.context) if context and shape.context else (context or shape.context or 2048)
    gpus, ram = memory if memory is not None else machine_memory()
    plan = Plan(source, shape, ctx, batch, gpus, ram)
    current = precision_of(quantization, dtype_bytes, double_quant)
    precisions = PRECISIONS if current in PRECISIONS else [*PRECISIONS, current]
    for p in precisions:
        kv = shape.kv_bytes_per_token(p.dtype_bytes)
        row = Row(p, weight_bytes(shape, p), kv, kv * ctx, kv * ctx * batch,
                  shape.prefill_activation_bytes(ctx, p.dtype_bytes), current=p == current)
        row.verdict = verdict(row.total, p, gpus, ram, device)
        plan.rows.append(row)
    if shape.model_type not in VERIFIED:
        plan.notes.append(f"{shape.model_type!r} is not among the checked layouts ({', '.join(sorted(VERIFIED))}): "
                          "the counts assume a Llama-like decoder.")
    return plan


def verdict(need: int, p: Precision, gpus: list[Memory], ram: Memory, device: str = "auto") -> str:
    device = device.lower()
    if device == "mps" and p.quantization != "none":
        return "not on MPS (bitsandbytes has no MPS backend)"
    if gpus and device not in ("cpu", "mps"):
        pool = [g for g in gpus if device in ("auto", "cuda") or g.name == device]
        if pool:
            best = max(pool, key=lambda g: g.free)
            spare = best.free - need - RUNTIME_RESERVE
            if spare >= 0:
                return f"fits on {best.name} with {gib(spare)} to spare"
            by_free = sorted(pool, key=lambda g: g.free, reverse=True)
            for n in range(2, len(by_free) + 1):  # accelerate splits the layers (and their KV) over the GPUs
                if sum(g.free - RUNTIME_RESERVE for g in by_free[:n]) >= need:
                    return f"needs {n} GPUs ({gib(need)} over {', '.join(g.name for g in by_free[:n])})"
    spare = ram.free - need - RUNTIME_RESERVE
    where = "fits in unified memory" if device == "mps" else ("fits in RAM only" if gpus else "fits in RAM")
    if spare >= 0:
        return f"{where} with {gib(spare)} to spare"
    if need + RUNTIME_RESERVE <= ram.total:
        return f"does not fit now: needs {gib(need + RUNTIME_RESERVE)}, {gib(ram.free)} of the RAM is free"
    return f"does not fit: needs {gib(need + RUNTIME_RESERVE)}, RAM is {gib(ram.total)}"


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def format_plan(plan: Plan) -> str:
    s = plan.shape
    lines = [
        f"Memory plan for {plan.source}",
        f"  model        {s.params / 1e9:.3f} B parameters ({s.model_type}): {s.describe()}",
        f"  context      {plan.context} tokens, batch {plan.batch} (MAX_RUNNING_REQUESTS)",
        "  this machine " + "; ".join([f"{g.name} {gib(g.free)} free of {gib(g.total)}" for g in plan.gpus]
                                      + [f"RAM {gib(plan.ram.free)} available of {gib(plan.ram.total)}"]),
        "",
        f"  {'precision':<22}{'weights':>12}{'KV/token':>11}{'KV 1 seq':>12}{f'KV {plan.batch} seqs':>13}"
        f"{'total*':>12}  verdict",
    ]
    for r in plan.rows:
        label = r.precision.label + (" <- settings" if r.current else "")
        lines.append(f"  {label:<22}{gib(r.weights):>12}{r.kv_token / 1024:>8.1f} KiB{gib(r.kv_one):>12}"
                     f"{gib(r.kv_batch):>13}{gib(r.total):>12}  {r.verdict}")
    act = next(r.activations for r in plan.rows if r.current)
    lines += [
        "",
        f"  * total = weights + KV of {plan.batch} full-context sequences + ~{gib(act)} activations of one "
        f"full-length prefill; each device also keeps {gib(RUNTIME_RESERVE)} free for the runtime.",
        "  Lower MAX_MODEL_LEN or MAX_RUNNING_REQUESTS to shrink the KV cache; QUANTIZATION=8bit|4bit shrinks the "
        "weights.",
        *[f"  note: {n}" for n in plan.notes],
    ]
    return "\n".join(lines)


def plan_for_settings(settings) -> Plan:
    """The plan of the configured MODEL_PATH under the configured DEVICE/DTYPE/QUANTIZATION/batch/context."""
    from server.config import derive_model_name, resolve_model_path

    path = resolve_model_path(settings.model_path)
    shape = read_shape(path)
    dtype_bytes = 4 if settings.dtype == "float32" else 2
    return make_plan(shape, source=f"{derive_model_name(settings.model_path)} ({path})",
                     context=settings.max_model_len, batch=settings.max_running_requests,
                     quantization=settings.quantization, dtype_bytes=dtype_bytes,
                     double_quant=settings.quant_double, device=settings.device)


def print_plan(settings) -> int:
    """`python -m server --plan`: the table on stdout; exit status 1 with the reason if it cannot be made."""
    try:
        print(format_plan(plan_for_settings(settings)))
    except EngineError as exc:
        print(f"glm-serve --plan: {exc.message}", file=sys.stderr)
        return 1
    return 0


