"""ChatGLM3's tokenizer on plain sentencepiece, reproducing THUDM's remote `ChatGLMTokenizer` id for id.

Why not a `tokenizers`-based conversion: transformers 5 converts this `tokenizer.model` into a tokenizer that
disagrees with sentencepiece on runs of spaces and parses literal `</s>`/`<s>`/`<unk>` text as special tokens.
Sentencepiece itself is the reference, so we call it directly and add the nine ChatGLM3 specials on top.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from sentencepiece import SentencePieceProcessor

from server.families.chatglm3.files import checkpoint_file

# Appended after the sentencepiece vocabulary, in this order (ids 64789..64797 for the real model).
SPECIAL_TOKENS = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
ROLES = ("system", "user", "assistant", "observation")
# ChatGLM3's specials sit at fixed ids; a tokenizer.model of another size is not ChatGLM3's and would shift them.
CHATGLM3_SP_VOCAB_SIZE = 64789

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class ChatGLM3Tokenizer:
    """Encode/decode exactly as the original; `decode_text` is the concatenable variant used for streaming."""

    def __init__(self, model_file: str | os.PathLike[str]):
        self.sp = SentencePieceProcessor(model_file=str(model_file))
        n = self.sp.vocab_size()
        if n != CHATGLM3_SP_VOCAB_SIZE:
            raise ValueError(
                f"{model_file} has {n} pieces, ChatGLM3's tokenizer.model has {CHATGLM3_SP_VOCAB_SIZE}: "
                "this is not a ChatGLM3 tokenizer"
            )
        self.model_file = str(model_file)
        self.special_tokens = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.index_special_tokens = {i: tok for tok, i in self.special_tokens.items()}
        self.vocab_size = n + len(SPECIAL_TOKENS)

        self.bos_token_id = self.sp.bos_id()  # 1, never used by ChatGLM3 prompts
        self.eos_token_id = self.sp.eos_id()  # 2
        self.unk_token_id = self.pad_token_id = self.sp.unk_id()  # 0, as in the original
        self.eos_token, self.pad_token, self.unk_token = "</s>", "<unk>", "<unk>"
        st = self.special_tokens
        self.mask_token_id, self.gmask_token_id, self.smask_token_id = st["[MASK]"], st["[gMASK]"], st["[sMASK]"]
        self.sop_token_id, self.eop_token_id = st["sop"], st["eop"]
        self.system_token_id, self.user_token_id = st["<|system|>"], st["<|user|>"]
        self.assistant_token_id, self.observation_token_id = st["<|assistant|>"], st["<|observation|>"]
        # The original renders bos/eos/pad as "" (they are control pieces that never appear in text).
        self._blank_ids = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        self._piece_bytes = [self._bytes_of(i) for i in range(n)]

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike[str], *, revision: str | None = None) -> ChatGLM3Tokenizer:
        """From a local folder (or the tokenizer.model file itself), else from a Hugging Face hub repo id."""
        path = Path(path_or_repo).expanduser()
        if path.is_file():
            return cls(path)
        return cls(checkpoint_file(path_or_repo, "tokenizer.model", revision=revision))

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encoding -------------------------------------------------------------------------------------------

    def sp_encode(self, text: str) -> list[int]:
        """Plain sentencepiece: special-token text inside `text` stays text (the prompt-injection guard)."""
        return self.sp.encode(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp_encode(text)
        return self.prefix_tokens() + ids if add_special_tokens else ids

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def prefix_tokens(self) -> list[int]:
        return [self.gmask_token_id, self.sop_token_id]

    def role_token_id(self, role: str) -> int:
        if role not in ROLES:
            raise ValueError(f"ChatGLM3 has no role {role!r} (roles: {', '.join(ROLES)})")
        return self.special_tokens[f"<|{role}|>"]

    def build_single_message(self, role: str, metadata: str, content: str) -> list[int]:
        """`<|role|>` + encode(metadata + "\\n") + encode(content), as the original `build_single_message`."""
        return [self.role_token_id(role)] + self.sp_encode(f"{metadata}\n") + self.sp_encode(content)

    # ---- ids <-> pieces -------------------------------------------------------------------------------------

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._id_to_piece(ids)
        return [self._id_to_piece(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._piece_to_id(tokens)
        return [self._piece_to_id(t) for t in tokens]

    def _id_to_piece(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        # Ids past the sentencepiece vocab exist in the model's padded output layer (65024 rows) but mean nothing.
        if index in self._blank_ids or index < 0 or index >= len(self._piece_bytes):
            return ""
        return self.sp.id_to_piece(index)

    def _piece_to_id(self, token: str) -> int:
        return self.special_tokens.get(token, self.sp.piece_to_id(token))

    # ---- decoding -------------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The original's text: specials rendered literally, 0/1/2 as "", leading dummy-prefix space dropped.

        The original `skip_special_tokens` only skips its HF-level specials (unk/pad 0 and eos 2), which render
        as "" anyway, so it never removes [gMASK], sop or the role tokens; we keep that.
        """
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.pad_token_id, self.eos_token_id)]
        # sentencepiece joins pieces it does not know (our specials, "") verbatim, exactly like the original.
        return self.sp.decode_pieces([self._id_to_piece(i) for i in ids])

    def decode_text(self, ids: Iterable[int], render: Mapping[int, str] | None = None) -> str:
        """Text that concatenates: decode_text(a + b) == decode_text(a) + decode_text(b) at character borders.

        Unlike `decode`, the dummy-prefix space of the first piece is kept ("▁" is always " ") and byte-fallback
        pieces are joined as UTF-8 bytes, so decoding a growing slice of ids only ever appends text (an incomplete
        character shows as a trailing U+FFFD until its last byte arrives). Special ids are dropped unless `render`
        names a text for them.
        """
        render = render or {}
        out = bytearray()
        n = len(self._piece_bytes)
        for i in ids:
            i = int(i)
            if 0 <= i < n:
                out += self._piece_bytes[i]
            elif i in render:
                out += render[i].encode()
        return out.decode("utf-8", errors="replace")

    def piece_bytes(self, index: int) -> bytes:
        """One id's own bytes, as decode_text joins them; a special token by its name, padding ids as b""."""
        if 0 <= index < len(self._piece_bytes):
            return self._piece_bytes[index]
        return self._id_to_piece(index).encode()

    def vocab_bytes(self) -> list[bytes]:
        """The bytes each id adds to `decode_text` (specials: none), for the structured-output grammar matcher."""
        return self._piece_bytes + [b""] * len(SPECIAL_TOKENS)

    def _bytes_of(self, index: int) -> bytes:
        if index in self._blank_ids or self.sp.is_control(index) or self.sp.is_unknown(index):
            return b""
        piece = self.sp.id_to_piece(index)
        if self.sp.is_byte(index):
            m = _BYTE_PIECE.match(piece)
            return bytes([int(m.group(1), 16)]) if m else b""
        return piece.replace("\u2581", " ").encode()
