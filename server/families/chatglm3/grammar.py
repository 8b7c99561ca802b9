"""ChatGLM3's answers as grammars (structured outputs): a JSON answer after the empty metadata line, and a tool call
in THUDM's own form, `tool_call(k=v, ...)` in a python block, generated from the function's JSON schema.

Text here is what `ChatGLM3Family.decode` makes of the ids, so it keeps sentencepiece's dummy-prefix spaces: the
answer " \\n {...}" is the metadata line "" then the content " {...}", and a call's content starts " ```python".
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from server.families.chatglm3.tools import TOOL_CALL_FUNCTION, _plain_keyword
from server.structured.grammar import CACHE_SIZE, SchemaError, concat, json_grammar, literal, optional, union

SPACE = 'root ::= " "?\n'  # a dummy-prefix space, which the model may or may not write
# THUDM's finetune data writes calls with ast.unparse: single-quoted strings and True/False/None. Where a value's
# schema is that plain (no enum, pattern or format), the python spelling is allowed beside the JSON one.
PY_CHAR = r'''[^'\\\r\n] | "\\" ['"\\nrt]'''  # one character of a single-quoted python string
PY_BOOL = 'root ::= "True" | "False"\n'
PY_NONE = 'root ::= "None"\n'

PLAIN_ANSWER = 'root ::= " "? "\\n" " "?\n'  # the empty metadata line of a plain answer, then the content's space
CALL_OPEN, CALL_CLOSE = f"```python\n{TOOL_CALL_FUNCTION}(", ")\n```"


def call_grammar(function: dict[str, Any], index: int) -> str:
    """The content of a tool-call message for `function`. Values are JSON literals, which the parser reads (true,
    false and null included); required arguments come first, then each optional one may follow. Keys that are not
    python identifiers, or a schema that is not a plain object of properties, use the parser's other form:
    `tool_call(**{...JSON object...})`."""
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    body = _call(json.dumps(schema, ensure_ascii=False), index)
    return concat(SPACE, body)


def metadata_and_call(functions: list[tuple[int, dict[str, Any]]]) -> str:
    """tool_choice "required" with several tools: the metadata line names one of them, then its call."""
    return concat(SPACE, union(*(concat(literal(f"{f['name']}\n"), call_grammar(f, i)) for i, f in functions)))


@lru_cache(maxsize=CACHE_SIZE)
def _call(schema_json: str, index: int) -> str:
    schema = json.loads(schema_json)
    where = f"tools.{index}.function.parameters"
    props = schema.get("properties")
    keyword_form = (isinstance(props, dict) and schema.get("type", "object") == "object"
                    and all(_plain_keyword(k) for k in props)
                    and not any(k in schema for k in ("anyOf", "oneOf", "allOf", "$ref", "patternProperties")))
    if not keyword_form:
        args = concat(literal("**"), json_grammar(schema, where=where))
        return concat(literal(CALL_OPEN), args, literal(CALL_CLOSE))
    required = schema.get("required", [])
    if not isinstance(required, list):
        raise SchemaError(f"{where}.required must be a list of property names.", param=f"{where}.required")
    shared = {k: schema[k] for k in ("$defs", "definitions") if k in schema}  # what "#/$defs/..." refs point at
    required = [k for k in props if k in required]
    rest = [k for k in props if k not in required]

    def kw(key: str) -> str:
        value = {**props[key], **shared} if shared and isinstance(props[key], dict) else props[key]
        return concat(literal(f"{key}="), _value(value, f"{where}.properties.{key}"))

    def then(keys: list[str]) -> list[str]:
        return [optional(concat(literal(", "), kw(k))) for k in keys]

    # Only the schema's own keywords: an extra name could repeat one, and python refuses a repeated keyword argument.
    if required:
        args = concat(kw(required[0]), *(concat(literal(", "), kw(k)) for k in required[1:]), *then(rest))
    elif rest:  # nothing required: any of them in order, the first without a comma, or none
        args = optional(union(*(concat(kw(k), *then(rest[i + 1:])) for i, k in enumerate(rest))))
    else:
        args = literal("")
    return concat(literal(CALL_OPEN), args, literal(CALL_CLOSE))


def _value(schema: Any, where: str) -> str:
    json_value = json_grammar(schema, where=where)
    if not isinstance(schema, dict) or set(schema) - {"type", "description", "title", "minLength", "maxLength"}:
        return json_value
    kind = schema.get("type")
    if kind == "string":
        python = _py_string(schema.get("minLength", 0), schema.get("maxLength"))
    else:
        python = {"boolean": PY_BOOL, "null": PY_NONE}.get(kind) if set(schema) <= {"type", "description", "title"} \
            else None
    return union(json_value, python) if python else json_value


def _py_string(low: Any, high: Any) -> str | None:
    if not isinstance(low, int) or (high is not None and not isinstance(high, int)):
        return None
    count = "*" if not low and high is None else f"{{{low},{'' if high is None else high}}}"
    return f"root ::= \"'\" char{count} \"'\"\nchar ::= {PY_CHAR}\n"

