"""LoRA adapters served beside their base model: one base in memory, one named peft adapter per served model id.

The adapters are never merged: peft's mixed-batch forward (`adapter_names=[...]` per row, "__base__" for the plain
model) lets requests for different adapters share one decode step, which the scheduler relies on.

Adapters trained on THUDM's original ChatGLM3 code name its modules (`transformer.encoder.layers.N.
self_attention.query_key_value`, `dense`, `mlp.dense_h_to_4h`, `mlp.dense_4h_to_h`); the server runs ChatGLM3
as transformers' GlmForCausalLM (q_proj/k_proj/v_proj, o_proj, gate_up_proj, down_proj). Renaming is enough
except for the fused qkv: its LoRA computes x -> A -> B with B's rows laid out [heads*hd | groups*hd |
groups*hd] like the fused weight, so q/k/v each get the same A and their slice of B's rows. That is exact:
row i of B@A depends on row i of B only.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from server.errors import EngineError
from server.families.chatglm3.names import FUSED_QKV, SPLIT_QKV, bare_targets, to_glm

log = logging.getLogger("glm_serve.lora")

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch

_TARGETS = bare_targets()  # bare module names, as LoraConfig.target_modules usually lists them
_QKV = f".{FUSED_QKV}."  # where to_glm leaves the fused qkv, to be split onto q/k/v


class AdapterError(EngineError):
    """An adapter that cannot be served on this base model; the message says why."""


def parse_lora_modules(value: str) -> dict[str, str]:
    """LORA_MODULES="name=path,name2=path2" -> {name: path}, in order."""
    adapters: dict[str, str] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, sep, path = (s.strip() for s in part.partition("="))
        if not sep or not name or not path:
            raise AdapterError(f"LORA_MODULES entry {part!r} is not name=path (e.g. sql-lora=/models/sql-lora).")
        if name in adapters:
            raise AdapterError(f"LORA_MODULES names {name!r} twice.")
        if name == BASE_ADAPTER:
            raise AdapterError(f"{BASE_ADAPTER!r} is reserved for the base model; choose another adapter name.")
        adapters[name] = path
    return adapters


def adapter_key(name: str, taken: set[str]) -> str:
    """A peft adapter name for a served model id: peft keys modules by it, and module names cannot hold '.'."""
    key = re.sub(r"[^0-9A-Za-z_-]", "_", name) or "adapter"
    base, i = key, 1
    while key in taken or key == BASE_ADAPTER:
        i += 1
        key = f"{base}_{i}"
    return key


def read_adapter(path: str):
    """(LoraConfig, state dict on CPU) of an adapter folder or hub repo holding adapter_config.json."""
    from peft import LoraConfig, PeftConfig
    from peft.utils import load_peft_weights

    local = Path(path).expanduser()
    if local.exists() and not (local / "adapter_config.json").is_file():
        raise AdapterError(f"{path} has no adapter_config.json: is it a peft LoRA adapter folder?")
    try:
        config = PeftConfig.from_pretrained(str(local) if local.exists() else path)
        weights = load_peft_weights(str(local) if local.exists() else path, device="cpu")
    except Exception as exc:
        raise AdapterError(f"Could not read the LoRA adapter {path!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"{path} is a {config.peft_type} adapter; only LoRA adapters can be served.")
    return config, weights


def is_chatglm_adapter(weights: Mapping[str, torch.Tensor]) -> bool:
    return any(".encoder.layers." in k or "transformer.output_layer" in k or "word_embeddings" in k for k in weights)


def translate_chatglm_adapter(config, weights: Mapping[str, torch.Tensor], *, q_rows: int, kv_rows: int):
    """A LoRA adapter on THUDM ChatGLM3 module names -> the same adapter on GlmForCausalLM's (see module doc)."""
    if getattr(config, "use_dora", False):
        raise AdapterError("DoRA adapters on ChatGLM3's original module names are not translated; merge it with "
                           "THUDM's code, or retrain on the GLM names (q_proj, k_proj, v_proj, ...).")
    if getattr(config, "lora_bias", False) or getattr(config, "fan_in_fan_out", False):
        raise AdapterError("LoRA adapters with lora_bias or fan_in_fan_out on ChatGLM3 names are not translated.")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        key = to_glm(key)
        if _QKV not in key:
            out[key] = tensor
        elif ".lora_A." in key or ".lora_embedding_A" in key:
            for proj in SPLIT_QKV:  # x -> A is shared by the three
                out[key.replace(_QKV, f".{proj}.")] = tensor
        elif ".lora_B." in key:
            if tensor.shape[0] != q_rows + 2 * kv_rows:
                raise AdapterError(f"{key}: {tensor.shape[0]} rows, but the base model's fused qkv has "
                                   f"{q_rows} + 2 x {kv_rows}: the adapter belongs to another model size.")
            for proj, part in zip(SPLIT_QKV, torch.split(tensor, [q_rows, kv_rows, kv_rows])):
                out[key.replace(_QKV, f".{proj}.")] = part.contiguous()
        else:
            raise AdapterError(f"Cannot split {key} of the fused query_key_value onto q/k/v.")
    config.target_modules = _translate_targets(config.target_modules)
    if config.modules_to_save:
        config.modules_to_save = _translate_targets(config.modules_to_save)
    for pattern in ("rank_pattern", "alpha_pattern"):
        mapping = getattr(config, pattern, None) or {}
        setattr(config, pattern, {t: v for k, v in mapping.items() for t in _translate_targets([k])})
    return config, out


def _translate_targets(targets: Any) -> Any:
    if isinstance(targets, str):
        if targets == "all-linear":
            return targets
        raise AdapterError(f"target_modules is the regex {targets!r}: list the ChatGLM3 module names instead, so "
                           "they can be mapped to the GLM ones.")
    out: list[str] = []
    for target in targets:
        renamed = to_glm(target)
        head, _, last = renamed.rpartition(".")
        if renamed.endswith(FUSED_QKV):
            out += [renamed[: -len(FUSED_QKV)] + p for p in SPLIT_QKV]
        elif not head and last in _TARGETS:
            out += _TARGETS[last]
        else:
            out.append(renamed)
    return sorted(set(out))


def attach_adapters(model, adapters: Mapping[str, str]):
    """Wrap `model` in a PeftModel holding every adapter of {served name: path}.

    Returns (peft model, {served name: peft adapter name}). The adapters are loaded in inference mode and
    stay unmerged, so any mix of them (and the base, as "__base__") can share a batch.
    """
    from peft import PeftModelForCausalLM, set_peft_model_state_dict

    if not adapters:
        return model, {}
    peft_model = None
    keys: dict[str, str] = {}
    for name, path in adapters.items():
        config, weights = read_adapter(path)
        translated = is_chatglm_adapter(weights)
        if translated:
            config, weights = translate_chatglm_adapter(config, weights, **_qkv_rows(model, path))
        config.inference_mode = True
        key = keys[name] = adapter_key(name, set(keys.values()))
        try:
            with warnings.catch_warnings():  # peft calls a transformers method deprecated in 5.x; not ours to fix
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                if peft_model is None:
                    peft_model = PeftModelForCausalLM(model, config, adapter_name=key)
                else:
                    peft_model.add_adapter(key, config)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            raise AdapterError(f"LoRA adapter {name!r} ({path}) does not fit this base model: {exc}") from exc
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=key)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{key}." in k]
        unexpected = [k for k in result.unexpected_keys if "lora_" in k]
        if missing or unexpected:
            raise AdapterError(
                f"LoRA adapter {name!r} ({path}) does not match this base model: "
                f"{len(missing)} adapter weight(s) missing (e.g. {missing[:1]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:1]}). Was it trained on another model?"
            )
        targets = config.target_modules
        log.info("LoRA adapter %s from %s: r=%s, alpha=%s, targets %s, %.2f M parameters%s", name, path, config.r,
                 config.lora_alpha, targets if isinstance(targets, str) else ",".join(sorted(targets)),
                 sum(t.numel() for t in weights.values()) / 1e6,
                 " (translated from ChatGLM3 module names)" if translated else "")
    peft_model.eval()
    return peft_model, keys


def _qkv_rows(model, path: str) -> dict[str, int]:
    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("glm", "glm4"):
        raise AdapterError(f"The LoRA adapter {path} was trained on ChatGLM3's module names (query_key_value...), "
                           f"but the base model is {getattr(cfg, 'model_type', type(model).__name__)}, not ChatGLM3.")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"q_rows": cfg.num_attention_heads * head_dim, "kv_rows": cfg.num_key_value_heads * head_dim}
