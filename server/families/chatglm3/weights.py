"""ChatGLM3 checkpoints (THUDM's `chatglm` format) loaded natively into transformers' `GlmForCausalLM`.

ChatGLM3 and GLM-4 share one architecture, and transformers implements it as `GlmForCausalLM`, RoPE layout
included (interleaved pairs on the first half of each head), so only names and the fused qkv differ. The mapping
is registered as a transformers checkpoint conversion: `from_pretrained` renames and splits each tensor while
it streams the shards in, so `device_map`, `dtype` and bitsandbytes quantization work as for any native model
and the 12 GB checkpoint is never held twice. No `.py` file of the checkpoint is ever imported.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from transformers import GenerationConfig, GlmConfig, GlmForCausalLM
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, ConversionOps, WeightConverter, WeightRenaming

from server.errors import EngineError
from server.families.chatglm3.files import checkpoint_file
from server.families.chatglm3.names import FUSED_QKV, RENAMES, SPLIT_QKV

CHATGLM3_EOS_TOKEN_IDS = [2, 64795, 64797]  # eos, <|user|>, <|observation|>: THUDM's chat stop list
CHATGLM3_PAD_TOKEN_ID = 0
CHATGLM3_VOCAB_SIZE = 65024  # padded_vocab_size of ChatGLM2/3; GLM-4's is 151552

# (field, value this loader implements): the knobs of THUDM's modeling code that GlmForCausalLM hard-wires.
_FIXED_ARCHITECTURE = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "add_bias_linear": False,
    "original_rope": True,
}
_REQUIRED_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
                    "padded_vocab_size", "seq_length", "multi_query_attention")  # fmt: skip


class UnsupportedCheckpointError(EngineError):
    """A `chatglm` checkpoint this loader cannot map; the message says what to use instead."""

    def __init__(self, message: str):
        super().__init__(message, code="unsupported_checkpoint")


def is_chatglm_config(config: Mapping[str, Any]) -> bool:
    """Whether a config.json is THUDM's `chatglm` format (any generation: load_chatglm3 explains the others)."""
    archs = config.get("architectures") or []
    return config.get("model_type") == "chatglm" or any(str(a).startswith("ChatGLM") for a in archs)


def check_chatglm3_config(config: Mapping[str, Any]) -> None:
    """Raise UnsupportedCheckpointError unless the config describes a ChatGLM3-6B-shaped model."""
    if not is_chatglm_config(config):
        raise UnsupportedCheckpointError(f"model_type {config.get('model_type')!r} is not a chatglm checkpoint")
    if "position_encoding_2d" in config or "inner_hidden_size" in config or "max_sequence_length" in config:
        raise UnsupportedCheckpointError(
            "This is a ChatGLM-6B (v1) checkpoint: 2D position encoding, LayerNorm and GeLU, an architecture "
            "transformers does not implement. Only ChatGLM3-6B is supported; use THUDM/chatglm3-6b."
        )
    missing = [f for f in _REQUIRED_FIELDS if config.get(f) is None]
    if missing:
        raise UnsupportedCheckpointError(f"chatglm config lacks {', '.join(missing)}: not a ChatGLM3 checkpoint")
    if "chatglm2" in str(config.get("_name_or_path", "")).lower():
        raise UnsupportedCheckpointError(
            "This is a ChatGLM2-6B checkpoint: its weights would load, but it has no <|user|>/<|assistant|> role "
            "tokens and another prompt format, which this server does not implement. Use THUDM/chatglm3-6b."
        )
    if config["padded_vocab_size"] != CHATGLM3_VOCAB_SIZE:
        raise UnsupportedCheckpointError(
            f"padded_vocab_size {config['padded_vocab_size']} is not ChatGLM3's {CHATGLM3_VOCAB_SIZE} (GLM-4 in "
            "the original format?). GLM-4 loads natively from its -hf repo, e.g. THUDM/glm-4-9b-chat-hf."
        )
    wrong = {k: config[k] for k, v in _FIXED_ARCHITECTURE.items() if k in config and config[k] != v}
    if wrong:
        raise UnsupportedCheckpointError(
            f"unsupported ChatGLM variant: {wrong} (ChatGLM3-6B has {_FIXED_ARCHITECTURE})"
        )
    if config.get("pre_seq_len"):
        raise UnsupportedCheckpointError("P-tuning v2 prefix checkpoints (pre_seq_len) are not supported")


def chatglm_config_to_glm(config: Mapping[str, Any]) -> GlmConfig:
    """The GlmConfig of a ChatGLM3 config.json (ChatGLM3-6B, -32k and -base alike)."""
    check_chatglm3_config(config)
    heads = config["num_attention_heads"]
    kv_heads = config.get("multi_query_group_num", heads) if config["multi_query_attention"] else heads
    glm = GlmConfig(
        vocab_size=config["padded_vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=config["kv_channels"],  # not hidden/heads: they differ in general (and in the test fixture)
        hidden_act="silu",
        max_position_embeddings=config["seq_length"],
        rms_norm_eps=config.get("layernorm_epsilon", 1e-5),  # GlmConfig's default is GLM-4's 1.5625e-07
        attention_bias=config.get("add_qkv_bias", False),
        attention_dropout=config.get("attention_dropout", 0.0),
        tie_word_embeddings=False,
        # chatglm3-6b-32k stretches RoPE with base = 10000 * rope_ratio; RoPE covers half of each head.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0 * (config.get("rope_ratio") or 1),
            "partial_rotary_factor": 0.5,
        },
        pad_token_id=CHATGLM3_PAD_TOKEN_ID,  # GlmConfig defaults pad/eos to GLM-4's 151329...
        eos_token_id=list(CHATGLM3_EOS_TOKEN_IDS),
        bos_token_id=None,
    )
    glm.architectures = ["GlmForCausalLM"]
    return glm


def chatglm3_generation_config() -> GenerationConfig:
    # The real repo has no generation_config.json and its config.json names eos 2 only.
    return GenerationConfig(eos_token_id=list(CHATGLM3_EOS_TOKEN_IDS), pad_token_id=CHATGLM3_PAD_TOKEN_ID)


class SplitFusedQKV(ConversionOps):
    """query_key_value rows are [heads*head_dim | kv_heads*head_dim | kv_heads*head_dim] (weight and bias).

    Sizes come from the config rather than from the target parameters (transformers' `Split`), which may already
    be packed by a quantizer when this runs.
    """

    def convert(self, input_dict, source_patterns, target_patterns, config=None, **kwargs):
        tensors = next(iter(input_dict.values()))
        fused = tensors[0] if isinstance(tensors, list) else tensors
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        if fused.shape[0] != q + 2 * kv:
            raise ValueError(f"query_key_value has {fused.shape[0]} rows, the config implies {q} + 2 * {kv}")
        parts = torch.split(fused, [q, kv, kv], dim=0)
        return {target: part.contiguous() for target, part in zip(target_patterns, parts, strict=True)}

    @property
    def reverse_op(self) -> ConversionOps:
        return Concatenate(dim=0)


def _conversion() -> list[WeightRenaming | WeightConverter]:
    renames = [WeightRenaming(rf"(?<![\w]){re.escape(old)}\.", f"{new}.") for old, new in RENAMES]
    return renames + [WeightConverter(FUSED_QKV, list(SPLIT_QKV), operations=[SplitFusedQKV()])]


class _ChatGLM3Loader(GlmForCausalLM):
    """GlmForCausalLM under a name of its own: transformers looks conversions up by class name, so the mapping
    applies to our loads only, never to other GLM models in the process."""

    # A buffer in THUDM's checkpoints; GLM computes RoPE frequencies from the config.
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]


register_checkpoint_conversion_mapping(_ChatGLM3Loader.__name__, _conversion(), overwrite=True)


def read_chatglm_config(path: str | os.PathLike[str], *, revision: str | None = None) -> dict[str, Any]:
    """config.json of a local checkpoint folder or a hub repo id."""
    return json.loads(checkpoint_file(path, "config.json", revision=revision).read_text(encoding="utf-8"))


def load_chatglm3(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str,
    device_map: str | dict[str, Any] | None = None,
    quantization_config: Any = None,
    revision: str | None = None,
    **from_pretrained_kwargs: Any,
) -> GlmForCausalLM:
    """A ChatGLM3 checkpoint (folder or hub id; .safetensors or .bin shards, indexed or single) as GlmForCausalLM.

    Pass dtype=torch.float32 for exact numerics: the checkpoint is float16 and dtype="auto" computes in it.
    Extra keyword arguments (attn_implementation, cache_dir, token, ...) go to `from_pretrained`.
    """
    config = chatglm_config_to_glm(read_chatglm_config(path, revision=revision))
    model = _ChatGLM3Loader.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        device_map=device_map,
        quantization_config=quantization_config,
        revision=revision,
        generation_config=chatglm3_generation_config(),
        **from_pretrained_kwargs,
    )
    # Hand back a plain GlmForCausalLM that forgets the conversion it was loaded with (as transformers' gguf
    # loader does): save_pretrained then writes native GLM names, loadable by any transformers, not chatglm ones.
    model.__class__ = GlmForCausalLM
    model._weight_conversions = None
    return model
