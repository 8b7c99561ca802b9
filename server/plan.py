"""Will it fit? Weight and KV-cache memory of a model, from its config alone, against this machine's memory.

`python -m server --plan` prints the table for MODEL_PATH. Nothing is loaded: a folder or hub repo gives its
config.json, a .gguf file its metadata header. Parameters are counted from the shapes in the config; the
bitsandbytes figures follow what bitsandbytes actually stores, since transformers quantizes every nn.Linear but
lm_head and leaves embeddings, norms and biases in the compute dtype:
  8bit      1 byte per weight + one float32 scale per output row (SCB)
  4bit nf4  half a byte per weight + one float32 absmax per 64-weight block
  + double  the absmax as uint8 + one float32 per 256 blocks (+ one shared 256-entry code)
The loader logs this estimate next to the measured figure (`measured_weight_bytes`) after every load.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import EngineError

log = logging.getLogger("glm_serve.plan")

GiB = 2**30
# Headroom per device the table does not itemize: CUDA context / cuBLAS workspace and allocator slack on a GPU,
# the Python + torch runtime in RAM. A rule of thumb, not a measurement of this machine.
RUNTIME_RESERVE = GiB // 2

# Modeling code that wires attention biases itself instead of reading `attention_bias`: (q/k/v, o_proj);
# None means "whatever attention_bias says".
_ATTENTION_BIAS = {"qwen2": (True, False), "glm": (None, False), "glm4": (None, False), "mistral": (False, False)}
_FUSED_GATE_UP = {"chatglm", "glm", "glm4", "phi3"}  # one [2*ffn, hidden] Linear instead of gate + up
_NORMS_PER_LAYER = {"glm4": 4}  # GLM-4 adds post-attention and post-MLP norms
_QK_NORM = {"qwen3"}  # RMSNorm over each head's q and k
# Architectures whose layout the counts below were checked against (tests/test_plan.py); others are estimates.
VERIFIED = {"llama", "mistral", "qwen2", "qwen3", "glm", "glm4", "gemma", "chatglm"}


class PlanError(EngineError):
    """The config cannot be planned (unknown layout); the message says why."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    tied: bool  # lm_head shares the embedding matrix
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_gate_up: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False

    def matrices(self) -> list[tuple[int, int, bool]]:
        """(out, in, has_bias) of every nn.Linear in one layer: what bitsandbytes quantizes."""
        q, kv, h, f = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        mlp = [(2 * f, h, self.mlp_bias)] if self.fused_gate_up else [(f, h, self.mlp_bias)] * 2
        return [(q, h, self.qkv_bias), (kv, h, self.qkv_bias), (kv, h, self.qkv_bias), (h, q, self.o_bias),
                *mlp, (h, f, self.mlp_bias)]  # fmt: skip

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)  # + the untied lm_head

    @property
    def linear_params(self) -> int:
        return self.layers * sum(o * i for o, i, _ in self.matrices())

    @property
    def small_params(self) -> int:
        """Biases and norms: few, and never quantized."""
        biases = sum(o for o, _, b in self.matrices() if b)
        norms = self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return self.layers * (biases + norms) + self.hidden  # + the final norm

    @property
    def params(self) -> int:
        return self.embedding_params + self.linear_params + self.small_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes  # K and V, every layer

    def prefill_activation_bytes(self, tokens: int, dtype_bytes: int) -> int:
        """Rough peak of one prefill of `tokens` tokens: the MLP's [T, 2*ffn] + [T, ffn] and a few [T, hidden]."""
        return tokens * (3 * self.intermediate + 4 * self.hidden) * dtype_bytes

    def describe(self) -> str:
        kv = f"{self.kv_heads} KV heads" if self.kv_heads != self.heads else "no GQA"
        return (f"{self.layers} layers, hidden {self.hidden}, {self.heads} heads x {self.head_dim} ({kv}), "
                f"MLP {self.intermediate}, vocab {self.vocab}, {'tied' if self.tied else 'untied'} lm_head")


# ---- reading shapes ------------------------------------------------------------------------------------------


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """From a config.json dict: THUDM's chatglm format or a standard Hugging Face causal LM config."""
    if config.get("model_type") == "chatglm":
        return _chatglm_shape(config)
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers: the language model decides
        config = {**config["text_config"], "model_type": config["text_config"].get("model_type", "")}
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if config.get(key):
            raise PlanError(f"{config.get('model_type')} is a mixture-of-experts model; the planner counts dense "
                            "models only.")
    c = _with_class_defaults(config)
    model_type = c.get("model_type", "")
    heads = c["num_attention_heads"]
    qkv_bias, o_bias = _ATTENTION_BIAS.get(model_type, (None, None))
    attention_bias = bool(c.get("attention_bias", False))
    return ModelShape(
        model_type=model_type,
        layers=c["num_hidden_layers"],
        hidden=c["hidden_size"],
        intermediate=c["intermediate_size"],
        heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        vocab=c["vocab_size"],
        context=int(c.get("max_position_embeddings") or c.get("seq_length") or 0),
        tied=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        o_bias=attention_bias if o_bias is None else o_bias,
        mlp_bias=bool(c.get("mlp_bias", False)),
        fused_gate_up=model_type in _FUSED_GATE_UP,
        norms_per_layer=_NORMS_PER_LAYER.get(model_type, 2),
        qk_norm=model_type in _QK_NORM,
    )


def _chatglm_shape(c: dict[str, Any]) -> ModelShape:
    heads = c["num_attention_heads"]
    return ModelShape(
        model_type="chatglm",
        layers=c["num_layers"],
        hidden=c["hidden_size"],
        intermediate=c["ffn_hidden_size"],  # dense_h_to_4h is [2*ffn, hidden]: gate and up fused
        heads=heads,
        kv_heads=c.get("multi_query_group_num", heads) if c.get("multi_query_attention") else heads,
        head_dim=c.get("kv_channels") or c["hidden_size"] // heads,
        vocab=c.get("padded_vocab_size") or c["vocab_size"],
        context=int(c.get("seq_length") or 0),
        tied=False,  # output_layer is its own matrix in every ChatGLM checkpoint
        qkv_bias=bool(c.get("add_qkv_bias", False)),
        o_bias=bool(c.get("add_bias_linear", False)),
        mlp_bias=bool(c.get("add_bias_linear", False)),
        fused_gate_up=True,
    )


def _with_class_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """config.json omits fields equal to the config class's defaults (head_dim, tie_word_embeddings...)."""
    try:
        from transformers import AutoConfig

        fields = {k: v for k, v in config.items() if k != "model_type"}
        full = AutoConfig.for_model(config["model_type"], **fields).to_dict()
    except Exception:  # an architecture this transformers does not know: take the file as it is
        return dict(config)
    return {**full, **{k: v for k, v in config.items() if v is not None}}


def shape_from_gguf(path: str | Path) -> ModelShape:
    """From a GGUF file's metadata and tensor table (memory-mapped; no tensor is read or dequantized)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def meta(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = meta("general.architecture")
    tensors = {t.name for t in reader.tensors}
    heads = int(meta(f"{arch}.attention.head_count"))
    hidden = int(meta(f"{arch}.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return ModelShape(
        model_type=str(arch),
        layers=int(meta(f"{arch}.block_count")),
        hidden=hidden,
        intermediate=int(meta(f"{arch}.feed_forward_length")),
        heads=heads,
        kv_heads=int(meta(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(meta(f"{arch}.attention.key_length", hidden // heads)),
        vocab=int(meta(f"{arch}.vocab_size", len(tokens.data) if tokens else 0)),
        context=int(meta(f"{arch}.context_length", 0)),
        tied="output.weight" not in tensors,  # llama.cpp drops the output matrix when it is the embedding
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_down.bias" in tensors,
    )


def read_shape(path: str) -> ModelShape:
    if path.endswith(".gguf"):
        if not Path(path).is_file():
            raise PlanError(f"GGUF file {path} does not exist.")
        return shape_from_gguf(path)
    from server.backends.native.loader import read_config

    config = read_config(path)
    try:
        return shape_from_config(config)
    except KeyError as exc:
        raise PlanError(f"{path}: config.json has no {exc.args[0]!r}; the planner needs a decoder-only causal LM "
                        f"config (model_type {config.get('model_type')!r}).") from None


# ---- bytes ---------------------------------------------------------------------------------------------------


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


# ---- this machine -------------------------------------------------------------------------------------------


@dataclass
class Memory:
    name: str  # cuda:0, ..., RAM
    total: int
    free: int


def machine_memory() -> tuple[list[Memory], Memory]:
    """(each CUDA GPU, RAM). GPU figures come from the driver; RAM from /proc/meminfo (stdlib) or psutil."""
    gpus = []
    try:
        import torch

        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(Memory(f"cuda:{i}", total, free))
    except Exception as exc:  # a broken driver should not stop the plan from printing
        log.warning("could not query CUDA memory: %s", exc)
    return gpus, ram_memory()


def ram_memory() -> Memory:
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
        return Memory("RAM", info["MemTotal"], info.get("MemAvailable", info["MemFree"]))
    except (OSError, KeyError, ValueError):
        pass
    try:
        import psutil

        vm = psutil.virtual_memory()
        return Memory("RAM", vm.total, vm.available)
    except ImportError:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # macOS without psutil: total only
        return Memory("RAM", total, total)


# ---- the plan -----------------------------------------------------------------------------------------------


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
