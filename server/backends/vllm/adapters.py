"""LoRA adapters for vLLM: which folder vLLM loads for each served adapter, and the largest rank it must allow.

vLLM's ChatGLM model takes LoRA on THUDM's original modules (query_key_value, dense, dense_h_to_4h, dense_4h_to_h),
so an adapter in those names is passed as it is. An adapter trained on our native GLM model (q_proj, k_proj, v_proj,
o_proj, gate_up_proj, down_proj: what finetune/ and peft on GlmForCausalLM save) is rewritten once into those names
and cached under CACHE_DIR, exactly:
- q/k/v fuse into one query_key_value LoRA of rank r_q + r_k + r_v: A is [A_q; A_k; A_v] stacked, B is block
  diagonal with B_q, B_k, B_v in their rows of the fused output ([heads*hd | groups*hd | groups*hd]) and zeros
  elsewhere, so (B @ A) x = [B_q A_q x; B_k A_k x; B_v A_v x]: the three separate updates, row for row;
- each module's scale (alpha/r, rank/alpha patterns and rsLoRA included) is folded into its B, and every module is
  zero-padded to one rank R with alpha = R (scale 1): the padding adds exact zeros, and vLLM sees one plain rank.
Adapters for any other base model go to vLLM unchanged. The module-name table is server/families/chatglm3/names.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import ConfigError
from server.families.chatglm3.names import FUSED_QKV, SPLIT_QKV, to_chatglm

log = logging.getLogger("glm_serve.vllm")

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices (config/lora.py)
_FORMAT = "v1"  # bump when the translation changes, so stale cached copies are not reused
_GLM_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


@dataclass
class VLLMAdapter:
    name: str  # served model id, also vLLM's adapter name
    path: str  # what vLLM loads: the user's folder or our translated copy
    rank: int
    translated: bool = False


def prepare_adapters(adapters: dict[str, str], *, model_folder: str, cache_dir: str) -> list[VLLMAdapter]:
    base = read_json(Path(model_folder) / "config.json") if Path(model_folder).is_dir() else {}
    chatglm = base.get("model_type") == "chatglm"
    out = []
    for name, path in adapters.items():
        folder = Path(path).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(f"LoRA adapter {name!r}: {path} has no adapter_config.json (glm-serve on vLLM needs "
                              "a local peft LoRA folder).")
        config = read_json(folder / "adapter_config.json")
        if config.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"LoRA adapter {name!r} is a {config.get('peft_type')} adapter; only LoRA is served.")
        if chatglm and _uses_glm_names(folder, config):
            out.append(_translated(name, folder, config, base, Path(cache_dir)))
        else:
            out.append(VLLMAdapter(name, str(folder), _max_rank(config)))
    return out


def max_lora_rank(adapters: list[VLLMAdapter]) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds every adapter."""
    need = max((a.rank for a in adapters), default=1)
    for rank in VLLM_LORA_RANKS:
        if rank >= need:
            return rank
    raise ConfigError(f"A LoRA adapter has rank {need}; vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}.")


def _max_rank(config: dict[str, Any]) -> int:
    return max([int(config.get("r", 8)), *(int(v) for v in (config.get("rank_pattern") or {}).values())])


def _uses_glm_names(folder: Path, config: dict[str, Any]) -> bool:
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        return any(m in targets for m in _GLM_MODULES)
    if any(str(t).rpartition(".")[2] in _GLM_MODULES for t in targets):
        return True
    return any(f".{m}." in key for key in _weight_names(folder) for m in _GLM_MODULES)


def _weight_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    file = folder / "adapter_model.safetensors"
    if not file.exists():
        return []
    with safe_open(str(file), "pt") as f:
        return list(f.keys())


def _translated(name: str, folder: Path, config: dict[str, Any], base: dict[str, Any], cache: Path) -> VLLMAdapter:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{_FORMAT}|{stamp}".encode()).hexdigest()[:16]
    out = cache / "vllm-lora" / f"{re.sub(r'[^0-9A-Za-z_.-]', '_', name)}-{key}"
    if (out / "adapter_config.json").exists():
        rank = int(read_json(out / "adapter_config.json")["r"])
        log.info("LoRA adapter %s: using its ChatGLM3-named copy for vLLM in %s", name, out)
        return VLLMAdapter(name, str(out), rank, translated=True)
    tensors, new_config = translate_glm_adapter(load_adapter_weights(folder, name), config, base, adapter=name)
    write_adapter(tensors, new_config, out)
    log.info("LoRA adapter %s: translated from GLM module names (q/k/v fused, rank %d) for vLLM into %s",
             name, new_config["r"], out)
    return VLLMAdapter(name, str(out), int(new_config["r"]), translated=True)


def write_adapter(tensors: dict, config: dict[str, Any], out: Path) -> None:
    """A peft adapter folder, written atomically: a half-written copy is never picked up."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    try:
        tmp.rename(out)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)


def translate_glm_adapter(weights: dict, config: dict[str, Any], base: dict[str, Any], *, adapter: str = "adapter",
                          engine: str = "vLLM"):
    """(tensors, adapter_config) of a GLM-named LoRA adapter rewritten in ChatGLM3's module names (module doc).
    An adapter already in ChatGLM3's names comes out the same way (its scale folded, one rank): llama.cpp's
    GGUF adapters (server/backends/llamacpp/lora.py) take either kind through here."""
    import torch

    def refuse(why: str):
        return ConfigError(f"LoRA adapter {adapter!r} cannot be served on {engine}'s ChatGLM3: {why}")

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # ChatGLM module -> (A, scaled B)
    qkv: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, (a, b) in scaled_lora_pairs(weights, config, refuse, engine=engine).items():
        proj = next((p for p in SPLIT_QKV if module.endswith("." + p)), None)
        if proj is not None:
            layer = module[: -len(proj)]
            qkv.setdefault(to_chatglm(layer.rstrip(".")) + "." + FUSED_QKV, {})[proj] = (a, b)
        else:
            modules[to_chatglm(module)] = (a, b)
    if qkv:
        q_rows, kv_rows = _qkv_rows(base)
        for fused, parts in qkv.items():
            modules[fused] = _fuse_qkv(parts, q_rows, kv_rows, refuse)
    unknown = [m for m in modules if m.rpartition(".")[2] not in _CHATGLM_TARGETS]
    if unknown:
        raise refuse(f"modules {unknown[:3]} are not ChatGLM3 linear layers {engine} takes LoRA on.")
    padded, rank = one_rank(modules)
    tensors = {}
    for module, (a, b) in padded.items():
        tensors[f"{module}.lora_A.weight"] = a
        tensors[f"{module}.lora_B.weight"] = b
    new_config = {k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern", "use_rslora")}
    new_config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                      target_modules=sorted({m.rpartition(".")[2] for m in modules}))
    return tensors, new_config


def scaled_lora_pairs(weights: dict, config: dict[str, Any], refuse, *, engine: str = "vLLM") -> dict:
    """{module: (A, B * peft's scale for it)} of a plain LoRA adapter's weights (float32); `refuse(why)` makes the
    error for what is not plain LoRA."""
    import torch

    if config.get("use_dora"):
        raise refuse(f"DoRA adapters are not supported by {engine}.")
    if config.get("fan_in_fan_out") or config.get("lora_bias") or config.get("bias", "none") != "none":
        raise refuse("fan_in_fan_out, lora_bias and trained biases are not translated.")
    if config.get("modules_to_save"):
        raise refuse(f"modules_to_save {config['modules_to_save']} (fully trained layers) are not LoRA.")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _LORA_KEY.match(key)
        if not match:
            raise refuse(f"{key} is not a lora_A/lora_B weight (embedding LoRA is not supported on {engine}).")
        pairs.setdefault(match["module"], {})[match["part"]] = tensor.float()
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise refuse(f"{module} lacks its lora_A or lora_B weight.")
        out[module] = ab["lora_A"], ab["lora_B"] * _scale(config, module, ab["lora_A"].shape[0])
    return out


def one_rank(modules: dict) -> tuple[dict, int]:
    """Every (A, scaled B) zero-padded to the largest rank R: with alpha = R each scale is exactly 1 and the
    padding adds exact zeros, so an engine that takes one alpha per adapter computes each module's own update."""
    import torch

    rank = max(a.shape[0] for a, _ in modules.values())
    out = {}
    for module, (a, b) in modules.items():
        pad = rank - a.shape[0]
        if pad:
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        out[module] = a.contiguous(), b.contiguous()
    return out, rank


_CHATGLM_TARGETS = {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


def _fuse_qkv(parts, q_rows: int, kv_rows: int, refuse):
    import torch

    rows = {SPLIT_QKV[0]: q_rows, SPLIT_QKV[1]: kv_rows, SPLIT_QKV[2]: kv_rows}
    a_parts, blocks = [], []
    for proj in SPLIT_QKV:  # fused rows are [q | k | v]
        if proj in parts:
            a, b = parts[proj]
            if b.shape[0] != rows[proj]:
                raise refuse(f"{proj} LoRA has {b.shape[0]} output rows, the base model's has {rows[proj]}: "
                             "the adapter belongs to another model size.")
            a_parts.append(a)
            blocks.append((proj, b))
    a = torch.cat(a_parts)
    b = a.new_zeros(q_rows + 2 * kv_rows, a.shape[0])
    col, offsets = 0, {SPLIT_QKV[0]: 0, SPLIT_QKV[1]: q_rows, SPLIT_QKV[2]: q_rows + kv_rows}
    for proj, block in blocks:
        row = offsets[proj]
        b[row : row + block.shape[0], col : col + block.shape[1]] = block
        col += block.shape[1]
    return a, b


def _scale(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's per-module scaling: alpha / r (or / sqrt(r) with rsLoRA), with rank/alpha patterns by suffix."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _qkv_rows(base: dict[str, Any]) -> tuple[int, int]:
    hd = base["kv_channels"]
    groups = base.get("multi_query_group_num", base["num_attention_heads"]) if base.get("multi_query_attention") \
        else base["num_attention_heads"]
    return base["num_attention_heads"] * hd, groups * hd


def load_adapter_weights(folder: Path, name: str) -> dict:
    file = folder / "adapter_model.safetensors"
    if file.exists():
        from safetensors.torch import load_file

        return load_file(str(file))
    legacy = folder / "adapter_model.bin"
    if legacy.exists():
        import torch

        return torch.load(str(legacy), map_location="cpu", weights_only=True)
    raise ConfigError(f"LoRA adapter {name!r}: {folder} has no adapter_model.safetensors or .bin.")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))
