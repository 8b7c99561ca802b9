"""A family's vocabulary as xgrammar sees it: the bytes each token id adds to the answer text.

The grammar matcher must read a token exactly as our detokenizer writes it, or the mask and the text drift apart.
So the vocabulary is given as raw bytes per id (VocabType.RAW), taken from the same source as the family's decode:
- ChatGLM3: its sentencepiece pieces as `decode_text` joins them ("▁" is a space, <0xNN> one byte). The nine
  specials (role tokens, [gMASK], sop...) and the padded ids past the vocabulary (65024 output rows) are empty,
  which xgrammar treats as special: never allowed inside a grammar, only as a stop token at its end.
- Hugging Face tokenizers: xgrammar's own decoding (byte-level BPE or byte fallback), with every special or
  added-special token emptied, because the chat-template family decodes with skip_special_tokens.
"""

from __future__ import annotations

from collections.abc import Iterable


def tokenizer_info(family, vocab_size: int, stop_token_ids: Iterable[int]):
    """xgrammar TokenizerInfo for `family`'s tokenizer over `vocab_size` ids (the model's output rows)."""
    import xgrammar as xgr

    vocab = token_bytes(family.tokenizer, vocab_size)
    return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                             stop_token_ids=sorted(stop_token_ids), add_prefix_space=False)


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    own = getattr(tokenizer, "vocab_bytes", None)
    if own is not None:  # ChatGLM3Tokenizer
        vocab = list(own())
    else:
        vocab = _hf_token_bytes(tokenizer, vocab_size)
    vocab = vocab[:vocab_size]
    return vocab + [b""] * (vocab_size - len(vocab))


def _hf_token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    vocab = list(info.decoded_vocab)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(token_id))
    for token_id in special:
        if 0 <= token_id < len(vocab):
            vocab[token_id] = b""
    return vocab
