"""What the families ask for: the grammar of a whole answer, for a response_format or a forced tool call.

A family knows what its answers look like around the JSON (ChatGLM3 writes a metadata line first, a tool call as
`tool_call(...)` in a python block); these helpers build the grammar from those pieces. Each result is EBNF text,
cached, so a repeated schema costs one dictionary lookup.
"""

from __future__ import annotations

import json
import secrets
from functools import lru_cache
from typing import Any

from server.families.base import flatten_tools
from server.structured.grammar import CACHE_SIZE, concat, json_grammar, literal, union
from server.types import ChatEvent, FinishReason, TextDelta, ToolCallDelta


def response_grammar(response_format: dict[str, Any] | None, prefix: str | None = None) -> str | None:
    """The grammar of an answer in `response_format` (None: free text), after `prefix` (EBNF) if given."""
    if not response_format:
        return None
    schema = response_format.get("schema") if response_format["type"] == "json_schema" else None
    where = response_format.get("where") or "response_format.json_schema.schema"
    body = json_grammar(schema, where=where)
    return _joined(prefix, body) if prefix else body


@lru_cache(maxsize=CACHE_SIZE)
def _joined(*parts: str) -> str:
    return concat(*parts)


def forced_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> list[tuple[int, dict[str, Any]]] | None:
    """The tools one of which the answer must call: tool_choice "required" (all) or a named function (that one),
    with their index in `tools`; None when the model may answer freely ("auto", "none", no tools)."""
    functions = flatten_tools(tools)
    if not functions:
        return None
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or tool_choice).get("name")
        return [(i, f) for i, f in enumerate(functions) if f.get("name") == name] or None
    if tool_choice == "required":
        return list(enumerate(functions))
    return None


def parameters_grammar(function: dict[str, Any], index: int) -> str:
    """One JSON object of the function's `parameters`."""
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    return json_grammar(schema, where=f"tools.{index}.function.parameters")


# -- chat-template models: the whole answer is one call in JSON, as vLLM does it --------------------------------

def json_call_grammar(functions: list[tuple[int, dict[str, Any]]], named: bool) -> str:
    """A named function: the answer is its arguments object. "required": {"name": ..., "arguments": {...}}."""
    if named:
        return parameters_grammar(functions[0][1], functions[0][0])
    return union(*(concat(literal(f'{{"name": {json.dumps(f["name"], ensure_ascii=False)}, "arguments": '),
                          parameters_grammar(f, i), literal("}")) for i, f in functions))


class JsonCallParser:
    """Reads a constrained JSON answer back as one tool call (named: the answer is the arguments)."""

    def __init__(self, name: str | None):
        self._name = name
        self._text = ""

    def feed(self, text: str) -> list[ChatEvent]:
        self._text += text
        return []

    def finish(self, reason: FinishReason) -> tuple[list[ChatEvent], FinishReason]:
        text, self._text = self._text, ""
        if reason == "stop":
            try:
                value = json.loads(text)
                name, arguments = (self._name, value) if self._name else (value["name"], value["arguments"])
            except (ValueError, KeyError, TypeError):
                name = None
            if name is not None:
                call_id = f"call_{secrets.token_hex(12)}"
                return [ToolCallDelta(0, id=call_id, name=name),
                        ToolCallDelta(0, arguments=json.dumps(arguments, ensure_ascii=False))], "tool_calls"
        # Cut by max_tokens (or aborted): the incomplete JSON comes back as text, with that finish reason.
        return ([TextDelta(text)] if text else []), reason
