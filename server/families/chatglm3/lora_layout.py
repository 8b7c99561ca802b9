"""A LoRA adapter trained on ChatGLM3's GLM modules, written in THUDM's original module names for vLLM.

vLLM's ChatGLM model (and THUDM's own code) has one fused `query_key_value` module where we train three
(q_proj, k_proj, v_proj), so that is the one module that is more than a rename (names.py holds the renames): a
LoRA of rank r on each of q/k/v becomes one LoRA of rank 3r on query_key_value with A = [A_q; A_k; A_v] and
B = blockdiag(B_q, B_k, B_v), so B @ A = [B_q A_q; B_k A_k; B_v A_v], exactly the three updates. vLLM gives an
adapter one rank, so the other modules are padded to 3r with zero rows of A and zero columns of B (B @ A
unchanged), and alpha is scaled by 3 with the rank, keeping alpha / r, the scale of every update.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from server.families.chatglm3.names import FUSED_QKV, SPLIT_QKV, bare_targets, to_chatglm


def original_adapter(
    config: dict[str, Any], weights: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config dict, peft state dict) on GLM names -> the same update on THUDM's names (see above)."""
    if config.get("use_dora") or config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("only plain LoRA (one rank, no DoRA, rsLoRA or per-module ranks) has an original layout")
    r = int(config["r"])
    q, *kv = (f".{p}." for p in SPLIT_QKV)
    fused = f".{FUSED_QKV}."
    rank = 3 * r if any(q in k for k in weights) else r
    out: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        if any(p in key for p in kv):
            continue  # joined with q_proj below
        if q in key:
            trio = [weights[key.replace(q, p)] for p in (q, *kv)]
            key = key.replace(q, fused)
            tensor = torch.cat(trio) if ".lora_A." in key else torch.block_diag(*trio)
        elif ".lora_A." in key:
            tensor = torch.cat([tensor, tensor.new_zeros(rank - r, tensor.shape[1])])
        elif ".lora_B." in key:
            tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], rank - r)], dim=1)
        name = to_chatglm(key)
        if ".transformer." not in f".{name}":
            raise ValueError(f"{key} is not a module of ChatGLM3's GLM layout")
        out[name] = tensor.contiguous()
    glm_to_original = {new[0]: old for old, new in bare_targets().items() if len(new) == 1}
    qkv_leaves = {p.rpartition(".")[2] for p in SPLIT_QKV}
    targets = config["target_modules"]
    names: list[str] = []
    for target in [targets] if isinstance(targets, str) else targets:
        name = FUSED_QKV.rpartition(".")[2] if target in qkv_leaves else glm_to_original.get(target, target)
        if name not in names:
            names.append(name)
    return {**config, "r": rank, "lora_alpha": config["lora_alpha"] * rank / r, "target_modules": sorted(names)}, out
