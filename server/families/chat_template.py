"""Any Hugging Face chat model: the prompt is the tokenizer's own chat template."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

from server.errors import EngineError
from server.families.base import PlainTextParser, Prompt
from server.types import ChatRequest

log = logging.getLogger("glm_serve.families")

# Used only when a tokenizer ships no template at all (base models): plain ChatML.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ChatTemplateFamily:
    name = "chat_template"

    def __init__(self, tokenizer, eos_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = {int(i) for i in eos_token_ids if i is not None}
        if tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(int(tokenizer.eos_token_id))
        if not tokenizer.chat_template:
            log.warning("The tokenizer has no chat template; using plain ChatML. Answers may be poor.")
            tokenizer.chat_template = FALLBACK_TEMPLATE
        self.supports_tools = "tools" in tokenizer.chat_template
        self._byte_decoder: dict[str, int] | None = None  # built on the first logprobs request

    def build_prompt(self, request: ChatRequest) -> Prompt:
        from server.structured.formats import JsonCallParser, forced_tools, json_call_grammar, response_grammar

        tools = request.tools if request.tool_choice != "none" else None
        # tool_choice "required" or a named function: the whole answer is constrained to one call in JSON (as vLLM
        # does it) and read back as tool_calls; the template shows the tools where it can. "auto" stays text.
        forced = forced_tools(tools, request.tool_choice)
        if tools and not self.supports_tools:
            if not forced:
                raise EngineError(
                    "This model's chat template cannot express tools. Remove `tools` (or set tool_choice to "
                    "'none'), force a call with tool_choice, or serve a model with tool support such as ChatGLM3.",
                    param="tools",
                )
            tools = None
        messages = [self._message(m) for m in request.messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # jinja raises for conversations the template forbids (e.g. role order)
            raise EngineError(f"The model's chat template rejected these messages: {exc}", param="messages") from exc
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if forced:
            named = forced[0][1]["name"] if len(forced) == 1 else None
            return Prompt(list(ids), JsonCallParser(named), grammar=json_call_grammar(forced, named=bool(named)))
        return Prompt(list(ids), PlainTextParser(), grammar=response_grammar(request.response_format))

    @staticmethod
    def _message(m: dict) -> dict:
        out = {"role": m["role"], "content": m.get("content") or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if m.get(key) is not None:
                out[key] = m[key]
        return out

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def encode_raw(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))  # with the tokenizer's own bos, if it adds one

    def token_bytes(self, token_id: int) -> bytes:
        if self._byte_decoder is None:
            self._byte_decoder = _byte_decoder(self.tokenizer)
        added = self.tokenizer.added_tokens_decoder.get(token_id)
        if added is not None:
            return added.content.encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""  # an id past the tokenizer (a padded output layer)
        if self._byte_decoder and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)  # GPT-2 byte-level BPE
        if m := _BYTE_PIECE.match(piece):
            return bytes([int(m.group(1), 16)])  # sentencepiece byte fallback
        if piece.startswith("\u2581"):
            return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id]).encode()


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_decoder(tokenizer) -> dict[str, int]:
    """GPT-2's printable-character -> byte table when the tokenizer decodes byte-level pieces, else {}."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
    if "ByteLevel" not in kinds:
        return {}
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {chr(c): b for b, c in chars.items()}
