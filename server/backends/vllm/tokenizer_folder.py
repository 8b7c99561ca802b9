"""A tokenizer folder for vLLM, so its structured outputs see ChatGLM3's vocabulary.

vLLM builds the vocabulary its grammar matcher masks (xgrammar's TokenizerInfo) from a Hugging Face tokenizer, and
refuses structured outputs without one (`--tokens-only` loads none). ChatGLM3 ships only remote code, which we never
run, so glm-serve writes a `tokenizer.json` with the same ids: the sentencepiece pieces in order, the nine specials
after them, and sentencepiece's decoding ("▁" is a space, <0xNN> one byte), which is what xgrammar reads. Its model
is a plain piece -> id table: vLLM never encodes text with it (glm-serve sends token ids), it only reads the pieces.
Other models' folders already hold their own tokenizer, which vLLM loads as it is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

VERSION = "v1"


def tokenizer_folder(family, cache_dir: str) -> str | None:
    """The folder to pass as vLLM's --tokenizer for `family`, written once per tokenizer.model; None: the model's."""
    if family.name != "chatglm3":
        return None
    from server.families.chatglm3.tokenizer import SPECIAL_TOKENS

    tok = family.tokenizer
    digest = hashlib.sha256(Path(tok.model_file).read_bytes()).hexdigest()[:16]
    out = Path(cache_dir).expanduser() / f"vllm-tokenizer-chatglm3-{digest}-{VERSION}"
    if (out / "tokenizer.json").exists():
        return str(out)
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.sp.vocab_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    controls = {tok.sp.id_to_piece(i): i for i in (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id)}
    added = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for p, i in [*controls.items(), *tok.special_tokens.items()]]
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": tok.sp.id_to_piece(tok.unk_token_id)},
    }
    assert len(SPECIAL_TOKENS) == len(tok.special_tokens)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<unk>", "clean_up_tokenization_spaces": False,
        "extra_special_tokens": list(tok.special_tokens)}), encoding="utf-8")
    tmp.rename(out) if not out.exists() else None
    return str(out)
