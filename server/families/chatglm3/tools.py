"""ChatGLM3 tool calls: render them for prompts, read them back from the model's answer, safely.

ChatGLM3 answers `metadata + "\\n" + content` after `<|assistant|>`. Empty metadata is a plain answer; a tool name
is a call whose content is a python block `tool_call(k=v, ...)`; "interpreter" is code for a code interpreter.
THUDM's demo runs that block through python's eval, which lets the model (or whoever steers it through a prompt)
execute code on the server. Here it is only parsed: `ast.parse` for the call shape, `ast.literal_eval` for each
argument value, so nothing but literals is ever accepted.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
import secrets
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from server.types import ChatEvent, FinishReason, TextDelta, ToolCallDelta

# How the family's decode renders <|assistant|> inside an answer: the model may say a few words, then start a
# second assistant message with a tool call in it. The parser splits the answer on this text.
ASSISTANT_SEPARATOR = "<|assistant|>"
CODE_INTERPRETER = "interpreter"
TOOL_CALL_FUNCTION = "tool_call"
# The largest call block we try to parse; bigger ones come back as plain text.
MAX_CALL_CHARS = 1 << 20

_FENCE = re.compile(r"\A```[\w+-]*[ \t]*\n(?P<code>.*?)\n?```\Z", re.DOTALL)
_JSON_WORDS = {"true": True, "false": False, "null": None}


def render_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """The content of an assistant tool-call turn (its metadata line is `name`), as ChatGLM3 was fine-tuned:

    "```python\\ntool_call(location='Beijing', days=3)\\n```", built with `ast.unparse` like THUDM's
    finetune demo (python literals, single-quoted strings). Keys that are not python identifiers go into a
    `**{...}` in their place, so that every JSON object can be expressed in order; `parse_tool_call` reads both.
    """
    keywords: list[ast.keyword] = []
    for key, value in arguments.items():
        if _plain_keyword(key):
            keywords.append(ast.keyword(arg=key, value=_literal_node(value)))
        elif keywords and keywords[-1].arg is None:
            keywords[-1].value.keys.append(_literal_node(key))
            keywords[-1].value.values.append(_literal_node(value))
        else:
            keywords.append(ast.keyword(arg=None, value=_literal_node({key: value})))
    call = ast.Call(func=ast.Name(id=TOOL_CALL_FUNCTION, ctx=ast.Load()), args=[], keywords=keywords)
    return f"```python\n{ast.unparse(call)}\n```"


def _plain_keyword(key: str) -> bool:
    # Python reads identifiers NFKC-normalized ('µ' as 'μ', 'ﬁle' as 'file'): such keys would come back changed.
    return key.isidentifier() and not keyword.iskeyword(key) and unicodedata.normalize("NFKC", key) == key


def _literal_node(value: Any) -> ast.expr:
    if isinstance(value, Mapping):
        return ast.Dict(keys=[_literal_node(k) for k in value], values=[_literal_node(v) for v in value.values()])
    if isinstance(value, (list, tuple)):
        return ast.List(elts=[_literal_node(v) for v in value], ctx=ast.Load())
    if value is None or isinstance(value, (str, int, float, bool)):
        return ast.Constant(value)
    raise TypeError(f"tool call arguments must be JSON values, got {type(value).__name__}")


class _JsonWords(ast.NodeTransformer):
    """Models trained on JSON sometimes write true/false/null; read those bare names as literals."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_WORDS:
            return ast.copy_location(ast.Constant(_JSON_WORDS[node.id]), node)
        return node


def parse_tool_call(content: str, name: str | None = None) -> dict[str, Any] | None:
    """The arguments of a `tool_call(...)` block, or None when it is not exactly one call with literal arguments.

    The callee must be `tool_call` (or the tool's own name), with keyword arguments (or `**{literal dict}`) only.
    Values go through `ast.literal_eval`, so calls, attribute access, names and comprehensions are rejected.
    Never raises.
    """
    code = content.strip()
    fenced = _FENCE.match(code)
    if fenced:
        code = fenced.group("code").strip()
    if not code or len(code) > MAX_CALL_CHARS:
        return None
    try:
        tree = ast.parse(code, mode="eval")
        call = tree.body
        if not isinstance(call, ast.Call) or call.args or not isinstance(call.func, ast.Name):
            return None
        if call.func.id not in (TOOL_CALL_FUNCTION, name):
            return None
        arguments: dict[str, Any] = {}
        for kw in call.keywords:
            value = ast.literal_eval(_JsonWords().visit(kw.value))
            if kw.arg is not None:
                arguments[kw.arg] = value
            elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
                arguments.update(value)
            else:
                return None
        # As JSON values (tuples become lists); sets, bytes, complex and inf are not JSON, so not arguments.
        return json.loads(json.dumps(arguments, allow_nan=False))
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


class ChatGLM3OutputParser:
    """Streams a ChatGLM3 answer: plain text as it comes, tool calls once the answer is complete.

    Each assistant message of the answer starts with its metadata line, held back until its "\\n" arrives.
    Plain answers are stripped of surrounding whitespace like THUDM's `process_response` (`content.strip()`):
    the leading " " is sentencepiece's dummy prefix of the content, not model text. Streaming can't strip the
    end in advance, so trailing whitespace is held back until more text follows and dropped at the end.
    """

    def __init__(self, tool_names: Iterable[str] = (), forced_tool: str | None = None):
        self._tools = set(tool_names)
        # Metadata is a tool name or "interpreter"; a "line" much longer than any is really text without one.
        self._max_header = max([64, len(CODE_INTERPRETER), *(len(n) for n in self._tools)]) + 16
        self._pending = ""  # text not yet routed (may end with a partial ASSISTANT_SEPARATOR)
        self._header: str | None = ""  # the metadata line being read; None once read
        self._tool: str | None = None  # the tool the current message calls
        self._call = ""  # its content
        self._calls: list[tuple[str, str]] = []
        self._started = False  # the current text message has emitted (or skipped) its leading whitespace
        self._prefix = ""  # text to put before this message's first content
        self._held_ws = ""  # trailing whitespace held back
        self._any_text = False
        if forced_tool is not None:  # the prompt already ends with the metadata line
            self._header, self._tool = None, forced_tool

    def feed(self, text: str) -> list[ChatEvent]:
        self._pending += text
        events: list[ChatEvent] = []
        while (cut := self._pending.find(ASSISTANT_SEPARATOR)) >= 0:
            events += self._route(self._pending[:cut])
            events += self._end_message()
            self._pending = self._pending[cut + len(ASSISTANT_SEPARATOR) :]
        keep = _partial_suffix(self._pending, ASSISTANT_SEPARATOR)
        events += self._route(self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep :]
        return events

    def finish(self, reason: FinishReason) -> tuple[list[ChatEvent], FinishReason]:
        events = self._route(self._pending)
        self._pending = ""
        events += self._end_message()
        n_calls = 0
        for name, content in self._calls:
            # A call cut off by max_tokens (or an abort) is incomplete by definition: show it as text.
            arguments = parse_tool_call(content, name) if reason == "stop" else None
            if arguments is None:
                events += self._text_block(content.strip())
                continue
            call_id = f"call_{secrets.token_hex(12)}"
            events.append(ToolCallDelta(index=n_calls, id=call_id, name=name))
            events.append(ToolCallDelta(index=n_calls, arguments=json.dumps(arguments, ensure_ascii=False)))
            n_calls += 1
        self._calls = []
        return events, ("tool_calls" if n_calls and reason == "stop" else reason)

    # ---- one assistant message ------------------------------------------------------------------------------

    def _route(self, text: str) -> list[ChatEvent]:
        if self._header is not None:
            self._header += text
            line, newline, rest = self._header.partition("\n")
            if not newline and len(self._header) <= self._max_header:
                return []
            self._header = None
            if not newline:  # no metadata line at all: everything is content
                rest, line = line, ""
            return self._open(line.strip()) + self._route(rest)
        if self._tool is not None:
            self._call += text
            return []
        return self._stream(text)

    def _open(self, metadata: str) -> list[ChatEvent]:
        self._started, self._held_ws = False, ""
        self._prefix = "\n" if self._any_text else ""
        if metadata in self._tools:
            self._tool, self._call = metadata, ""
        elif metadata and metadata != CODE_INTERPRETER:
            # Not ours to interpret (an unknown tool, say): keep the model's words as they are.
            self._prefix += f"{metadata}\n"
        return []

    def _stream(self, text: str) -> list[ChatEvent]:
        if not self._started:
            text = text.lstrip()
            if not text:
                return []
            self._started = True
            text, self._prefix = self._prefix + text, ""
        text = self._held_ws + text
        body = text.rstrip()
        self._held_ws = text[len(body) :]
        if not body:
            return []
        self._any_text = True
        return [TextDelta(body)]

    def _end_message(self) -> list[ChatEvent]:
        events: list[ChatEvent] = []
        if self._header is not None:  # ended inside the metadata line: that line is all the model said
            events += self._text_block(self._header.strip())
        elif self._tool is not None:
            self._calls.append((self._tool, self._call))
        elif not self._started and self._prefix.strip():
            events += self._text_block(self._prefix.strip())  # an unknown metadata line without content
        self._header, self._tool, self._call, self._prefix, self._held_ws = "", None, "", "", ""
        return events

    def _text_block(self, text: str) -> list[ChatEvent]:
        if not text:
            return []
        sep = "\n" if self._any_text else ""
        self._any_text = True
        return [TextDelta(sep + text)]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
