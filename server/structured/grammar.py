"""A response_format (or a forced tool call) -> one grammar, checked once here for every engine.

The client's JSON schema becomes an xgrammar grammar, printed as EBNF text. That text is what crosses the engine
seam (GenerateRequest.grammar): the native engine compiles it against the model's vocabulary (matcher.py), vLLM
gets it as `structured_outputs.grammar` and compiles it with its own xgrammar. So a schema either compiles here,
for both engines, or is a 400 naming where in the schema it failed, before anything is queued or streamed.
Nothing here depends on a vocabulary; results are cached by the schema's JSON text (its property order is the
order the answer must follow, so it is kept).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from server.errors import EngineError

# Between JSON tokens the model may put whitespace (pretty-printing up to a few levels deep), but only this much:
# unbounded whitespace lets a weak model fill max_tokens with newlines and never close the object.
MAX_WHITESPACE = 16
CACHE_SIZE = 256  # distinct schemas (and tool sets) kept compiled; each entry is a few KB of EBNF text
MAX_SCHEMA_DEPTH = 32

_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedProperties", "unevaluatedItems", "additionalItems")
# Keywords xgrammar would ignore (with a log warning) rather than enforce: refused, so "valid for the schema" holds.
_UNENFORCED = {
    "number": ("multipleOf",),
    "integer": ("multipleOf",),
    "array": ("uniqueItems", "contains", "minContains", "maxContains"),
    "object": ("patternProperties", "dependentSchemas", "dependentRequired", "propertyNames"),
}
_UNENFORCED_ANY = ("not", "if", "then", "else")
_STRING_FORMATS = {"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
                   "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"}


class SchemaError(EngineError):
    """A schema that is not valid JSON Schema, or uses what constrained decoding cannot enforce (a 400). The message
    names the path in the schema; `param` is the request field holding it (response_format, tools, text.format)."""

    def __init__(self, message: str, param: str):
        root = "text.format" if param.startswith("text.format") else param.split(".")[0]
        super().__init__(message, param=root, code="invalid_schema")


def json_grammar(schema: dict[str, Any] | None, *, where: str) -> str:
    """EBNF for one JSON value of `schema` (None: any JSON object). `where` is the schema's path in the request
    ("response_format.json_schema.schema"): errors name the path inside it, and their `param` is the request field
    it starts with.

    Always xgrammar's strict mode, as vLLM compiles schemas, whatever the request's `strict` says: no properties or
    items beyond those the schema names, unless it allows them itself (additionalProperties: true). Without it a
    weak model keeps inventing properties until max_tokens."""
    if schema is not None:
        check_schema(schema, where)
    text = json.dumps(schema if schema is not None else {"type": "object"}, ensure_ascii=False)
    return _json_ebnf(text, schema is not None, where)


def concat(*parts: str) -> str:
    """EBNF matching the parts (EBNF texts) one after another."""
    import xgrammar as xgr

    return str(xgr.Grammar.concat(*(_grammar(p) for p in parts)))


def union(*parts: str) -> str:
    import xgrammar as xgr

    return str(xgr.Grammar.union(*(_grammar(p) for p in parts))) if len(parts) > 1 else parts[0]


def literal(text: str) -> str:
    """EBNF matching exactly `text`."""
    return f"root ::= {_quote(text)}\n" if text else 'root ::= ""\n'


def optional(part: str) -> str:
    return union(part, literal(""))


def _grammar(part: str):
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf(part)


def _quote(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@lru_cache(maxsize=CACHE_SIZE)
def _json_ebnf(schema_json: str, strict: bool, where: str) -> str:
    import xgrammar as xgr

    try:
        grammar = xgr.Grammar.from_json_schema(schema_json, any_whitespace=True, strict_mode=strict,
                                               max_whitespace_cnt=MAX_WHITESPACE)
    except Exception as exc:  # xgrammar raises RuntimeError / its own errors with a message saying what is wrong
        raise SchemaError(f"{where}: the schema cannot be compiled for constrained decoding: {_reason(exc)}",
                          param=where) from None
    return str(grammar)


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ source location ("[12:00:00] /project/cpp/x.cc:5082: ...")."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text)[:500]


def check_schema(schema: Any, where: str) -> None:
    """Refuse what is not a schema, and the keywords xgrammar cannot enforce, naming the path of the first one."""
    _check(schema, where, 0)


def _check(node: Any, path: str, depth: int) -> None:
    if isinstance(node, bool):
        return  # true / false are schemas
    if not isinstance(node, dict):
        raise SchemaError(f"{path} must be a JSON Schema object, not {type(node).__name__}.", param=path)
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(f"{path}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels.", param=path)
    kinds = node.get("type")
    names = kinds if isinstance(kinds, list) else [kinds] if kinds is not None else []
    for kind in names:
        if kind not in _TYPES:
            raise SchemaError(f"{path}.type: {kind!r} is not a JSON Schema type (one of {', '.join(sorted(_TYPES))}).",
                              param=f"{path}.type")
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise SchemaError(f"{path}.$ref: only references inside the schema (\"#/...\") are supported, not {ref!r}.",
                          param=f"{path}.$ref")
    for kind in names or list(_UNENFORCED):  # no type: the keyword applies to whatever the value is
        for key in _UNENFORCED.get(kind, ()):
            if key in node:
                raise SchemaError(f"{path}.{key} is not supported by constrained decoding (it cannot be enforced "
                                  "token by token); remove it from the schema.", param=f"{path}.{key}")
    for key in _UNENFORCED_ANY:
        if key in node:
            raise SchemaError(f"{path}.{key} is not supported by constrained decoding; remove it from the schema.",
                              param=f"{path}.{key}")
    fmt = node.get("format")
    if fmt is not None and ("string" in names or not names) and fmt not in _STRING_FORMATS:
        raise SchemaError(f"{path}.format {fmt!r} is not supported (supported: {', '.join(sorted(_STRING_FORMATS))}).",
                          param=f"{path}.format")
    if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
        raise SchemaError(f"{path}: minLength/maxLength together with pattern or format is not supported; keep "
                          "one of them.", param=path)
    required = node.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise SchemaError(f"{path}.required must be a list of property names.", param=f"{path}.required")
    enum = node.get("enum")
    if enum is not None and not (isinstance(enum, list) and enum):
        raise SchemaError(f"{path}.enum must be a non-empty list.", param=f"{path}.enum")
    for key in _SCHEMA_MAPS:
        if key in node:
            value = node[key]
            if not isinstance(value, dict):
                raise SchemaError(f"{path}.{key} must be an object of schemas.", param=f"{path}.{key}")
            for name, sub in value.items():
                _check(sub, f"{path}.{key}.{name}", depth + 1)
    for key in _SCHEMA_LISTS:
        if key in node:
            value = node[key]
            if not isinstance(value, list) or not value:
                raise SchemaError(f"{path}.{key} must be a non-empty list of schemas.", param=f"{path}.{key}")
            for i, sub in enumerate(value):
                _check(sub, f"{path}.{key}.{i}", depth + 1)
    for key in _SCHEMA_ONE:
        if key in node:
            _check(node[key], f"{path}.{key}", depth + 1)
