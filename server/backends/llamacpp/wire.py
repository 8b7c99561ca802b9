"""The wire format of llama-server's native `POST /completion`: our request -> its JSON, its SSE -> token ids.

Verified against llama.cpp build 11434 (tools/server: server-schema.cpp, server-context.cpp, server-task.cpp)
and a running server:
- `prompt` as a list of ints is taken as token ids as they are (no BOS added, nothing tokenized).
- Every sampler is set explicitly: llama-server's defaults (top_k 40, min_p 0.05, repeat_penalty 1.1 over the
  last 64 tokens) would not be ours. `samplers` is the chain, in transformers' order: penalties, temperature,
  top-k, top-p (llama.cpp's default puts temperature last; a sampler not listed is not applied). Its penalties
  run over the whole context (`repeat_last_n`) and count the prompt's tokens too, for presence/frequency as
  for repetition (OpenAI and vLLM count only the answer's for the first two). temperature 0 keeps only the top
  logit: greedy.
- Streamed: `data: {"content", "tokens": [id], "stop": false, "tokens_predicted": n, ...}` per token, then one
  `data: {"stop": true, "stop_type": "eos"|"limit"|"word"|"none", "tokens_predicted": n, ...}`.
- llama-server holds a token back while its text ends inside a UTF-8 character (`validate_utf8` in
  process_token): no event carries its id. The next event's `tokens_predicted` jumps by the number held back and its
  `content` carries their bytes, so `recover_held` finds the ids again from the model's vocabulary (the bytes and
  the count are exact; where two splits of the same bytes into the same number of tokens exist, the ids may be
  the other split, which decodes to the same text). We ask for a few tokens more than max_tokens and cut at
  max_tokens ourselves, so a character cut by the limit is still released (`HOLD_MARGIN`).
- It stops by itself on the model's end-of-generation tokens (eos/eot in the GGUF); `ignore_eos` would forbid
  them (a -inf bias), so we leave it off and end a sequence ourselves on our other stop ids (closing the stream
  aborts the slot).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson

from server.backends.child.client import error_message
from server.backends.child.stream import UpstreamError
from server.types import SamplingParams

COMPLETION_PATH = "/completion"
HOLD_MARGIN = 3  # a UTF-8 character is at most 4 bytes: at most 3 more tokens release one cut by the limit
FORCE_BIAS = 1000.0  # added to the allowed ids at a forced-prefix branch: every other id is out of reach


def completion_body(prompt: list[int], sampling: SamplingParams, *, n_predict: int, stream: bool, context: int,
                    allowed: list[int] | None = None, grammar: str | None = None,
                    banned: tuple[int, ...] = (), lora: list[dict] | None = None) -> bytes:
    """`grammar`: GBNF (gbnf.py) the answer must match. `banned`: ids never sampled (a bias of false is -inf).
    `lora`: [{"id", "scale"}] for every loaded adapter (one unlisted would be 0)."""
    body: dict[str, Any] = {
        "prompt": prompt,
        "n_predict": n_predict,
        "stream": stream,
        "return_tokens": True,
        # Reuse the slot's KV for the prompt's common prefix (llama-server's default) for sampled requests. Reused
        # KV gives logits a little off a whole-prompt prefill (llama.cpp's kernels depend on the batch size), so a
        # greedy or seeded request prefills whole: the same request then gets the same answer whatever the slot
        # held before (streamed == not, the native engine's greedy answer), for ~5% of throughput at 1 and 16
        # streams (bench.engines: 0.89x / 0.94x raw llama-server against 0.92x / 0.98x with reuse).
        "cache_prompt": sampling.seed is None and sampling.temperature > 0,
        "temperature": max(sampling.temperature, 0.0),
        # 0 = off in both; greedy sends 1, the same argmax: with top-k off llama.cpp sorts the whole vocabulary for
        # every token (its softmax), 6.6 -> 0.8 ms per token for a ChatGLM3 q4_0 at one stream (bench.gguf_types)
        "top_k": 1 if sampling.temperature <= 0 else sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": sampling.repetition_penalty,
        "repeat_last_n": context,  # the whole context (it refuses -1; its penalty window is allocated this long)
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "dry_multiplier": 0.0,
        "xtc_probability": 0.0,
        "mirostat": 0,
        "samplers": ["penalties", "temperature", "top_k", "top_p"],
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    bias = {int(k): float(v) for k, v in (getattr(sampling, "logit_bias", None) or {}).items()}
    if allowed:
        bias.update({t: bias.get(t, 0.0) + FORCE_BIAS for t in allowed})
    entries: list[list] = [[t, b] for t, b in bias.items() if t not in banned]
    entries += [[t, False] for t in banned]
    if entries:
        body["logit_bias"] = entries
    if grammar is not None:
        body["grammar"] = grammar
    if lora is not None:
        body["lora"] = lora
    return orjson.dumps(body)


def parse_event(line: str) -> dict | None:
    """One SSE line -> its JSON; None for keep-alives and blank lines."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    event = orjson.loads(data)
    if "error" in event:
        raise UpstreamError(error_message(event))
    return event


# -- ids llama-server held back ---------------------------------------------------------------------------------


class Vocab:
    """Each token id's bytes as llama.cpp renders it, from the GGUF the server loads."""

    def __init__(self, pieces: list[bytes], control: tuple[int, ...] = ()):
        self.pieces = pieces
        # Control tokens (role markers...): llama.cpp's grammar reads them as their text ("<|im_start|>" would fit
        # inside a JSON string), so a constrained sequence bans those that are not its stop ids, as native does.
        self.control = control
        self._by_bytes: dict[bytes, int] = {}
        for i, p in enumerate(pieces):
            if p:
                self._by_bytes.setdefault(p, i)
        self._longest = max((len(p) for p in self._by_bytes), default=1)

    def split(self, data: bytes, count: int) -> list[int] | None:
        """`count` ids whose bytes are `data`, or None."""

        @cache
        def go(start: int, left: int) -> tuple[int, ...] | None:
            if start == len(data):
                return () if left == 0 else None
            if left == 0:
                return None
            for end in range(min(len(data), start + self._longest), start, -1):  # long pieces first
                tid = self._by_bytes.get(data[start:end])
                if tid is not None and (rest := go(end, left - 1)) is not None:
                    return (tid, *rest)
            return None

        found = go(0, count)
        return list(found) if found is not None else None


def recover_held(vocab: Vocab, content: str, last_id: int, held: int) -> list[int]:
    """The `held` ids before `last_id` whose bytes `content` carries with last_id's own, in order; [] if the bytes
    cannot be split so (text the server replaced, being invalid UTF-8)."""
    data, own = content.encode("utf-8"), vocab.pieces[last_id] if last_id < len(vocab.pieces) else b""
    if not data.endswith(own):
        return []
    return vocab.split(data[: len(data) - len(own)], held) or []


def gguf_vocab(path: str) -> Vocab:
    """Token pieces from the GGUF (tokenizer.ggml.tokens / token_type / model) as llama_token_to_piece makes them:
    byte-level BPE (gpt2) through GPT-2's byte <-> unicode table, sentencepiece (llama) with '▁' as a space and
    <0xXX> byte tokens; control tokens render as nothing."""
    meta = gguf_metadata(path, ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"))
    model, texts = meta.get("tokenizer.ggml.model"), meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(texts)
    decoder = {v: k for k, v in _bytes_to_unicode().items()}
    pieces, control = [], []
    for text, kind in zip(texts, types):
        if kind == 3:  # CONTROL
            pieces.append(b"")
            control.append(len(pieces) - 1)
        elif kind == 4:  # USER_DEFINED: as written
            pieces.append(text.encode("utf-8"))
        elif model == "gpt2":
            pieces.append(bytes(decoder[c] for c in text) if all(c in decoder for c in text) else text.encode())
        elif kind == 6 and text.startswith("<0x") and text.endswith(">"):  # BYTE
            pieces.append(bytes([int(text[3:-1], 16)]))
        else:
            pieces.append(text.replace("\u2581", " ").encode("utf-8"))
    return Vocab(pieces, tuple(control))


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The named key-value entries of a GGUF header, read directly (gguf's GGUFReader took 20-30 s for SmolLM2's
    49,152 tokens here; this reads them in well under a second). Stops once every key is found."""
    import struct

    with open(path, "rb") as f:
        def read(fmt: str):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        def value(kind: int):
            if kind == 8:
                return string()
            if kind == 9:
                item, count = read("<I"), read("<Q")
                if item in _SCALARS:
                    fmt = _SCALARS[item]
                    size = struct.calcsize(fmt)
                    return list(struct.unpack(f"<{count}{fmt[1]}", f.read(size * count)))
                return [value(item) for _ in range(count)]
            return read(_SCALARS[kind])

        if f.read(4) != b"GGUF":
            raise UpstreamError(f"{path} is not a GGUF file")
        read("<I"), read("<Q")  # version, tensor count
        found: dict[str, Any] = {}
        for _ in range(read("<Q")):
            key, kind = string(), read("<I")
            val = value(kind)
            if key in keys:
                found[key] = val
                if len(found) == len(keys):
                    break
        return found


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the one byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
