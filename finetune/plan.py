"""`python -m finetune --plan`: the memory a run needs, from the model's config alone, against this machine.

Built on the server's planner (server/plan: the shape from config.json or the GGUF header, bitsandbytes-exact
weight sizes, this machine's GPUs and RAM, the same verdict). Training adds:
  LoRA      r x (in + out) per adapted matrix, 16 bytes per parameter: the float32 weight, its gradient and
            AdamW's two moments
  act.      activations kept for backward, for full-length batches (batch x max-length tokens; batches of
            shorter rows pad less and need less). The base is frozen, so a linear layer keeps no input unless
            it carries LoRA: per layer and token, each RMSNorm's float32 input, normalized value and output
            (2 x 3 h), attention's q, k and v (k and v repeated to all heads) and output (4 q), the MLP's gate,
            activation and up (3 f), plus each adapted module's input; with gradient checkpointing only each
            layer's input (h) is kept, plus one layer's worth while it is recomputed
  logits    batch x length x vocab x (compute dtype + 12 bytes: the float32 log-softmax the loss keeps, and the
            gradients of both)
An estimate for choosing settings, not a measurement: the allocator's slack comes on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.config import FinetuneConfig


@dataclass
class TrainRow:
    label: str
    weights: int
    lora_params: int
    activations: int
    logits: int
    verdict: str = ""
    current: bool = False

    @property
    def total(self) -> int:
        return self.weights + 16 * self.lora_params + self.activations + self.logits


def _module_names(shape) -> list[str]:
    mlp = ["gate_up_proj"] if shape.fused_gate_up else ["gate_proj", "up_proj"]
    return ["q_proj", "k_proj", "v_proj", "o_proj", *mlp, "down_proj"]


def adapted(shape, targets) -> list[tuple[int, int]]:
    """(out, in) of each matrix of one layer that LoRA adapts."""
    mats = [(o, i) for o, i, _ in shape.matrices()]
    if targets == "all-linear":
        return mats
    return [m for name, m in zip(_module_names(shape), mats) if name in targets]


def activation_bytes(shape, targets, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
    h, f = shape.hidden, shape.intermediate
    q = shape.heads * shape.head_dim
    norms = 2 * 3 * h * 4  # computed in float32 whatever the dtype
    per_layer = norms + dtype_bytes * (4 * q + 3 * f + sum(i for _, i in adapted(shape, targets)))
    if checkpointing:
        return tokens * (shape.layers * h * dtype_bytes + per_layer)
    return tokens * shape.layers * per_layer


def make_rows(cfg: FinetuneConfig, shape, targets, gpus, ram, device: str, checkpointing: bool,
              fp32: bool) -> list[TrainRow]:
    from server.plan import precision_of, verdict, weight_bytes

    tokens = cfg.batch_size * cfg.max_length
    lora = shape.layers * sum(cfg.lora_rank * (o + i) for o, i in adapted(shape, targets))
    rows = []
    for method, quant, dtype_bytes, label in (("lora", "none", 4, "LoRA, fp32 base"),
                                              ("lora", "none", 2, "LoRA, bf16/fp16 base"),
                                              ("qlora", "4bit", 2, "QLoRA, 4-bit nf4 base")):
        p = precision_of(quant, dtype_bytes, cfg.quant_double)
        row = TrainRow(label, weight_bytes(shape, p), lora,
                       activation_bytes(shape, targets, tokens, dtype_bytes, checkpointing),
                       tokens * shape.vocab * (dtype_bytes + 12))
        row.current = method == cfg.method and (method == "qlora" or (dtype_bytes == 4) == fp32)
        row.verdict = verdict(row.total, p, gpus, ram, device)
        rows.append(row)
    return rows


def format_training_plan(cfg: FinetuneConfig) -> str:
    from finetune.model import choose_dtype, model_path, parse_targets
    from server.backends.native.device import pick_device
    from server.plan import gib, machine_memory, read_shape

    path = model_path(cfg)
    shape = read_shape(path)
    targets = parse_targets(cfg.target_modules, shape.model_type == "chatglm")
    gpus, ram = machine_memory()
    device = pick_device(cfg.device) if cfg.device != "auto" else ("cuda" if gpus else "cpu")
    checkpointing = cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and bool(gpus)
                                                           and device.startswith("cuda"))
    fp32 = choose_dtype(cfg, device, path) == "float32"
    rows = make_rows(cfg, shape, targets, gpus, ram, cfg.device, checkpointing, fp32)
    lines = [
        f"Fine-tuning memory plan for {cfg.model or path}",
        f"  model        {shape.params / 1e9:.3f} B parameters ({shape.model_type}): {shape.describe()}",
        f"  LoRA         r={cfg.lora_rank} on {targets if isinstance(targets, str) else ','.join(targets)}: "
        f"{rows[0].lora_params / 1e6:.2f} M parameters",
        f"  batch        {cfg.batch_size} x {cfg.max_length} tokens (x{cfg.gradient_accumulation} accumulation "
        f"costs time, not memory), gradient checkpointing {'on' if checkpointing else 'off'}",
        "  this machine " + "; ".join([f"{g.name} {gib(g.free)} free of {gib(g.total)}" for g in gpus]
                                      + [f"RAM {gib(ram.free)} available of {gib(ram.total)}"]),
        "",
        f"  {'method':<36}{'weights':>11}{'LoRA+Adam':>11}{'act.':>11}{'logits':>11}{'total':>11}  verdict",
    ]
    for r in rows:
        label = r.label + (" <- settings" if r.current else "")
        lines.append(f"  {label:<36}{gib(r.weights):>11}{gib(16 * r.lora_params):>11}{gib(r.activations):>11}"
                     f"{gib(r.logits):>11}{gib(r.total):>11}  {r.verdict}")
    other = activation_bytes(shape, targets, cfg.batch_size * cfg.max_length, 2, not checkpointing)
    lines += [
        "",
        "  Estimates for full-length batches; rows shorter than --max-length need less. --gradient-checkpointing "
        f"{'off' if checkpointing else 'on'} would make the bf16 activations {gib(other)}.",
        "  Lower --batch-size (raise --gradient-accumulation to keep the effective batch) or --max-length to "
        "shrink activations and logits; --method qlora shrinks the weights.",
    ]
    return "\n".join(lines)
