"""A model's shape (layers, widths, heads, vocabulary) read from its config.json or a GGUF header, nothing loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import EngineError

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
    from server.model_files import read_config

    config = read_config(path)
    try:
        return shape_from_config(config)
    except KeyError as exc:
        raise PlanError(f"{path}: config.json has no {exc.args[0]!r}; the planner needs a decoder-only causal LM "
                        f"config (model_type {config.get('model_type')!r}).") from None


