"""The one table of ChatGLM3 module names (THUDM's checkpoints and LoRA adapters) against transformers' GLM ones.

The weight loader, the LoRA adapter translation, the merge tool and the vLLM adapter export all read it, so a
name is written once. No torch here. ChatGLM3 fuses q/k/v into one `query_key_value` (rows laid out
[heads*head_dim | kv_heads*head_dim | kv_heads*head_dim]); GLM keeps three projections.
"""

from __future__ import annotations

import re

# (ChatGLM3 module path, GlmForCausalLM module path); whole dotted components, applied in this order.
RENAMES: list[tuple[str, str]] = [
    ("transformer.embedding.word_embeddings", "model.embed_tokens"),
    ("transformer.encoder.final_layernorm", "model.norm"),
    ("transformer.output_layer", "lm_head"),
    ("transformer.encoder.layers", "model.layers"),
    ("self_attention.dense", "self_attn.o_proj"),
    ("mlp.dense_h_to_4h", "mlp.gate_up_proj"),  # the same [gate; up] rows
    ("mlp.dense_4h_to_h", "mlp.down_proj"),
]
FUSED_QKV = "self_attention.query_key_value"
SPLIT_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _component(name: str) -> re.Pattern:
    return re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")


_TO_GLM = [(_component(old), new) for old, new in RENAMES]
_TO_CHATGLM = [(_component(new), old) for old, new in RENAMES]


def to_glm(name: str) -> str:
    """A ChatGLM3 module/weight name in GLM's names (a fused qkv keeps its name: callers split it)."""
    for pattern, new in _TO_GLM:
        name = pattern.sub(new, name)
    return name


def to_chatglm(name: str) -> str:
    """A GLM module/weight name in ChatGLM3's names (q/k/v keep theirs: callers fuse them)."""
    for pattern, old in _TO_CHATGLM:
        name = pattern.sub(old, name)
    return name


def bare_targets() -> dict[str, list[str]]:
    """Last-component module names, as LoraConfig.target_modules lists them: ChatGLM3's -> GLM's."""
    table = {old.rpartition(".")[2]: [new.rpartition(".")[2]] for old, new in RENAMES}
    table[FUSED_QKV.rpartition(".")[2]] = [p.rpartition(".")[2] for p in SPLIT_QKV]
    return table
