"""python -m server.convert MODEL OUT.gguf --type f16|q8_0|q4_0: a ChatGLM3 checkpoint as a GGUF for llama.cpp.

It writes llama.cpp's `chatglm` layout, as its own convert_hf_to_gguf.py (conversion/chatglm.py, set_vocab_chatglm3)
does, with the `gguf` package and without THUDM's remote code: the fused query_key_value (weight and bias) and
dense_h_to_4h ([gate; up]) stay fused, the vocabulary is the sentencepiece model's pieces with ChatGLM3's
specials as control tokens, eos 2, and <|user|> / <|observation|> as end-of-turn tokens so llama.cpp stops there
too. 1-D tensors (norms, biases) stay float32; q8_0 / q4_0 quantize every matrix whose rows are a multiple of 32.

llama.cpp's chatglm graph takes the attention output as hidden x hidden, so a checkpoint must have
heads * kv_channels == hidden_size (every real ChatGLM3 does; the tiny test fixture, 4 heads of 16 over a hidden
size of 16, does not and cannot load there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger("glm_serve.convert")

TYPES = ("f32", "f16", "q8_0", "q4_0")
_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


def convert(model: str, out: str | os.PathLike[str], kind: str = "f16") -> Path:
    import gguf
    import sentencepiece

    from server.families.chatglm3 import check_chatglm3_config
    from server.families.chatglm3.files import checkpoint_file

    config = json.loads(checkpoint_file(model, "config.json").read_text(encoding="utf-8"))
    check_chatglm3_config(config)
    heads, hidden, head_dim = config["num_attention_heads"], config["hidden_size"], config["kv_channels"]
    if heads * head_dim != hidden:
        raise ValueError(f"{model}: {heads} heads x kv_channels {head_dim} != hidden_size {hidden}; llama.cpp's "
                         "chatglm graph needs them equal (every released ChatGLM3 has them equal).")
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "chatglm")
    writer.add_name(config.get("_name_or_path") or Path(model).name)
    writer.add_context_length(config.get("seq_length", 8192))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["ffn_hidden_size"])
    writer.add_block_count(config["num_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["multi_query_group_num"] if config.get("multi_query_attention") else heads)
    writer.add_layer_norm_rms_eps(config.get("layernorm_epsilon", 1e-5))
    writer.add_rope_dimension_count(head_dim // 2)  # rotary on half of each head
    writer.add_rope_freq_base(10000.0 * config.get("rope_ratio", 1))
    writer.add_add_bos_token(False)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    _vocab(writer, sentencepiece.SentencePieceProcessor(model_file=str(checkpoint_file(model, "tokenizer.model"))),
           config["padded_vocab_size"])
    for name, tensor in _tensors(model):
        target = tensor_name(name, config["num_layers"])
        if target is None:
            continue
        data, qtype = _encode(tensor, kind)
        writer.add_tensor(target, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)  # atomic: a half-written file is never picked up
    return out


def cached_gguf(model: str, cache_root: Path, kind: str = "f16") -> Path:
    """The GGUF of a ChatGLM3 folder, converted once per checkpoint and type into CACHE_DIR."""
    config = Path(model) / "config.json"
    stamp = ":".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(Path(model).glob("*"))
                     if p.is_file()) if Path(model).is_dir() else model
    key = hashlib.sha256(f"{Path(model).resolve() if config.exists() else model}:{stamp}".encode()).hexdigest()[:16]
    out = cache_root / f"{Path(model.rstrip('/')).name}-{key}.{kind}.gguf"
    if out.exists():
        log.info("Using the GGUF copy of %s in %s", model, out)
        return out
    cache_root.mkdir(parents=True, exist_ok=True)
    log.info("Converting %s once to a %s GGUF for llama.cpp: %s", model, kind, out)
    return convert(model, out, kind)


def _vocab(writer, sp, vocab_size: int) -> None:
    import gguf

    types = gguf.TokenType
    tokens, scores, kinds = [], [], []
    n_sp = sp.get_piece_size()
    specials = {64789 + i: name for i, name in enumerate(_SPECIALS)}  # ChatGLM3's ids for them
    for i in range(vocab_size):
        if i < n_sp:
            piece = {0: "<unk>", 1: "<bos>", 2: "<eos>"}.get(i, sp.id_to_piece(i))
            kind = (types.UNKNOWN if sp.is_unknown(i) else types.CONTROL if sp.is_control(i)
                    else types.UNUSED if sp.is_unused(i) else types.BYTE if sp.is_byte(i) else types.NORMAL)
            tokens.append(piece.encode("utf-8"))
            scores.append(sp.get_score(i))
            kinds.append(kind)
        elif i in specials:
            tokens.append(specials[i].encode("utf-8"))
            scores.append(0.0)
            kinds.append(types.CONTROL)
        else:
            tokens.append(f"[PAD{i}]".encode())
            scores.append(0.0)
            kinds.append(types.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("chatglm-spm")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_eot_token_id(64795)  # <|user|>
    writer.add_eom_token_id(64797)  # <|observation|>


def _tensors(model: str):
    """(name, float32 array) of every weight, shard by shard (.safetensors, else .bin)."""
    folder = Path(model)
    shards = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not shards:
        raise FileNotFoundError(f"{model} has no .safetensors or pytorch_model*.bin weights")
    import torch

    for shard in shards:
        if shard.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(torch.float32).numpy()
        else:
            state = torch.load(shard, map_location="cpu", weights_only=True)
            for name, tensor in state.items():
                yield name, tensor.to(torch.float32).numpy()


def tensor_name(name: str, n_layers: int) -> str | None:
    """The GGUF name of a ChatGLM3 weight (None: not written); LoRA adapters map theirs through it too."""
    import gguf

    if name.endswith("rotary_pos_emb.inv_freq"):
        return None  # a buffer, recomputed by llama.cpp
    mapped = gguf.get_tensor_name_map(gguf.MODEL_ARCH.CHATGLM, n_layers).get_name(
        name.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ValueError(f"unexpected tensor {name} in a ChatGLM3 checkpoint")
    return mapped


def _encode(tensor: np.ndarray, kind: str):
    import gguf
    from gguf.quants import quantize

    if tensor.ndim == 1 or kind == "f32":
        return tensor.astype(np.float32), gguf.GGMLQuantizationType.F32
    if kind in ("q8_0", "q4_0") and tensor.shape[-1] % 32 == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else gguf.GGMLQuantizationType.Q4_0
        return quantize(tensor, qtype), qtype
    return tensor.astype(np.float16), gguf.GGMLQuantizationType.F16


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m server.convert", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a ChatGLM3 checkpoint folder (config.json, tokenizer.model, weights)")
    ap.add_argument("out", help="the .gguf file to write")
    ap.add_argument("--type", choices=TYPES, default="f16", help="weight type of the matrices (default f16)")
    args = ap.parse_args(argv)
    out = convert(args.model, args.out, args.type)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")


if __name__ == "__main__":
    main()
