"""The base model, loaded by the server's own loader, with peft LoRA layers on it: LoRA or QLoRA (4-bit nf4 base).

Loading through `load_chat_model` means a fine-tune starts from exactly the modules the server runs: ChatGLM3 as
transformers' GlmForCausalLM (q_proj/k_proj/v_proj...), a GGUF file dequantized to the same cached folder, and
QLoRA's base quantized by the same bitsandbytes config as QUANTIZATION=4bit. So the adapter's module names are
the served model's, and LORA_MODULES loads it with no translation.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from finetune.config import FinetuneConfig

log = logging.getLogger("glm_serve.finetune")

# ChatGLM3: the four modules THUDM's code and vLLM's ChatGLM LoRA know, in their original names; others: every
# linear layer but lm_head (peft's "all-linear").
CHATGLM3_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@dataclass
class TrainModel:
    model: Any  # peft PeftModelForCausalLM
    family: Any
    device: str  # where inputs go
    dtype: torch.dtype
    targets: list[str] | str  # as given to peft (GLM names for ChatGLM3)
    chatglm3: bool


def model_path(cfg: FinetuneConfig) -> str:
    """--model, else MODEL_PATH as the server reads it (env / .env / the embedded default), resolved to a path."""
    from server.config import Settings, resolve_model_path

    return resolve_model_path(cfg.model or Settings().model_path)


def cache_dir(cfg: FinetuneConfig) -> str:
    from server.config import Settings

    return cfg.cache_dir or os.environ.get("CACHE_DIR") or Settings.model_fields["cache_dir"].default


def choose_dtype(cfg: FinetuneConfig, device: str, path: str) -> str:
    """auto: bf16 on GPUs with it (fp16 otherwise), float32 on MPS; on CPU float32 unless the CPU computes bf16
    natively or the float32 weights would fill over half the free RAM (the server's DTYPE=auto rule)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device == "mps":
        return "float32"
    from server.backends.native.device import cpu_auto_dtype, cpu_has_native_bf16
    from server.plan import PRECISIONS, ram_memory, read_shape, weight_bytes

    if cfg.method == "qlora":  # the 4-bit weights are small; this is the compute dtype
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    try:
        fp32 = weight_bytes(read_shape(path), PRECISIONS[0])
    except Exception:  # an unknown layout: the loader will say what is wrong
        fp32 = None
    return cpu_auto_dtype(fp32, ram_memory().free)


def default_targets(chatglm3: bool) -> list[str] | str:
    return list(CHATGLM3_TARGETS) if chatglm3 else "all-linear"


def parse_targets(value: str, chatglm3: bool) -> list[str] | str:
    """--target-modules -> peft's target_modules, ChatGLM3's original names mapped onto the GLM modules."""
    if not value.strip():
        targets: list[str] | str = default_targets(chatglm3)
    elif value.strip() == "all-linear":
        return "all-linear"
    else:
        targets = [t.strip() for t in value.split(",") if t.strip()]
    if chatglm3 and isinstance(targets, list):
        from server.families.chatglm3.names import bare_targets

        table = bare_targets()
        targets = list(dict.fromkeys(name for t in targets for name in table.get(t, [t])))
    return targets


def load(cfg: FinetuneConfig, path: str) -> TrainModel:
    """Load the base, freeze it, add fresh LoRA layers (seeded); raises EngineError for settings that cannot work."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from server.backends.native.device import pick_device, place
    from server.backends.native.loader import load_chat_model

    device = pick_device(cfg.device)
    dtype = choose_dtype(cfg, device, path)
    quantization = "4bit" if cfg.method == "qlora" else "none"
    placement = place(cfg.device, dtype, quantization, cfg.quant_double)
    loaded = load_chat_model(path, placement, cache_dir=cache_dir(cfg))
    model, family = loaded.model, loaded.family
    chatglm3 = family.name == "chatglm3"
    model.config.use_cache = False  # no KV cache in training forward passes
    checkpointing = cfg.gradient_checkpointing == "on" or (cfg.gradient_checkpointing == "auto" and
                                                           device.startswith("cuda"))
    kwargs = {"use_reentrant": False}  # works with frozen inputs; no enable_input_require_grads needed
    if cfg.method == "qlora":
        # Casts the norms/embeddings bitsandbytes left unquantized to float32, as the QLoRA recipe does.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=kwargs)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    targets = parse_targets(cfg.target_modules, chatglm3)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)  # the LoRA A matrices are random: the same seed, the same start
    try:
        with warnings.catch_warnings():  # peft calls a transformers method deprecated in 5.x; not ours to fix
            warnings.filterwarnings("ignore", category=FutureWarning)
            peft_model = get_peft_model(model, lora)
    except ValueError as exc:  # "Target modules {...} not found in the base model"
        from server.errors import EngineError

        raise EngineError(f"--target-modules {cfg.target_modules or targets!r} do not fit this model: {exc}") from None
    peft_model.peft_config["default"].base_model_name_or_path = cfg.model or path
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g dropout=%g on %s: %.2f M trainable parameters (%s base, %s, gradient "
             "checkpointing %s)", cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
             targets if isinstance(targets, str) else ",".join(targets), trainable / 1e6,
             "4-bit nf4" if cfg.method == "qlora" else dtype, placement.describe(), "on" if checkpointing else "off")
    return TrainModel(peft_model, family, placement.input_device, placement.dtype, targets, chatglm3)
