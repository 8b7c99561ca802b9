"""Training rows from the files people have, checked field by field before anything is loaded or written.

Three formats, detected from the first row (or named with --format), each turned into one conversation in the
OpenAI layout the server receives, so the model family renders it exactly as it renders requests:
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[question, answer], ...]}; the user turn is
            instruction + "\\n" + input (input left out when empty), as in the Alpaca/LLaMA-Factory convention
  chatglm3  THUDM's finetune_demo format {"conversations": [{"role", "content", "loss"?}], "tools"?}; a
            {"role": "tool", "name", "parameters", "observation"} turn is an assistant tool call (trained) plus its
            result as an observation (never trained), as THUDM's preprocessing does; "observation" turns are results
  openai    OpenAI chat fine-tuning JSONL {"messages": [...], "tools"?}; an assistant "weight": 0 is not trained
A file is a JSON list of rows (or one row), or JSON Lines. Errors name the file, the row (and line) and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("alpaca", "chatglm3", "openai")
_KEYS = {"alpaca": "instruction", "chatglm3": "conversations", "openai": "messages"}
_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_CHATGLM3_ROLES = ("system", "user", "assistant", "observation", "tool")


class DataError(ValueError):
    """A row that cannot be trained on; the message names file, row and field."""


@dataclass
class Conversation:
    messages: list[dict[str, Any]]  # OpenAI layout, content as text
    tools: list[dict[str, Any]] | None
    trained: list[bool]  # per message: is it an answer to learn
    where: str  # "train.json row 3 (line 3)", for later errors


def read_rows(path: str | Path) -> list[tuple[str, Any]]:
    """[(where, row)] of a JSON list / object or a JSON Lines file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    whole = None
    if path.suffix != ".jsonl":  # .json may be a list, one object or (as THUDM's AdvertiseGen files) JSON Lines
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            if text.lstrip().startswith("["):
                raise DataError(f"{path}: not valid JSON (a file is one JSON list or one JSON object per line)") \
                    from None
    if isinstance(whole, list):
        return [(f"{path.name} row {i}", row) for i, row in enumerate(whole, 1)]
    if isinstance(whole, dict):
        return [(f"{path.name} row 1", whole)]
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} row {len(rows) + 1} (line {line_no})"
        try:
            rows.append((where, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); a file is one JSON list "
                            "or one JSON object per line") from None
    return rows


def detect_format(rows: list[tuple[str, Any]]) -> str:
    where, row = rows[0]
    if isinstance(row, dict):
        for fmt, key in _KEYS.items():
            if key in row:
                return fmt
    raise DataError(f"{where}: cannot tell the format: expected an object with 'instruction' and 'output' "
                    "(alpaca), 'conversations' (chatglm3) or 'messages' (openai)")


def load(path: str | Path, fmt: str = "auto") -> tuple[str, list[Conversation]]:
    """(format, conversations) of a data file; DataError at the first bad row."""
    rows = read_rows(path)
    fmt = detect_format(rows) if fmt == "auto" else fmt
    convert = {"alpaca": _alpaca, "chatglm3": _chatglm3, "openai": _openai}[fmt]
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be a JSON object, not {type(row).__name__}")
        if _KEYS[fmt] not in row:
            raise DataError(f"{where}: field '{_KEYS[fmt]}' is missing (the {fmt} format, as detected from row 1 "
                            "or given by --format)")
        conversation = Conversation(*convert(row, where), where=where)
        if not any(t for t, m in zip(conversation.trained, conversation.messages) if m["role"] == "assistant"):
            raise DataError(f"{where}: no assistant answer to learn from")
        out.append(conversation)
    return fmt, out


def _text(value: Any, where: str, field: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    what = "is missing" if value is None else f"must be a string, not {type(value).__name__}"
    raise DataError(f"{where}: field '{field}' {what}")


def _alpaca(row: dict, where: str):
    instruction = _text(row.get("instruction"), where, "instruction")
    extra = _text(row.get("input"), where, "input", required=False)
    output = _text(row.get("output"), where, "output")
    if not output.strip():
        raise DataError(f"{where}: field 'output' is empty: there is no answer to learn")
    question = f"{instruction}\n{extra}" if extra else instruction
    if not question.strip():
        raise DataError(f"{where}: fields 'instruction' and 'input' are both empty")
    messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": _text(row["system"], where, "system")})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field 'history' must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"{where}: field 'history[{i}]' must be a [question, answer] pair")
        messages.append({"role": "user", "content": _text(pair[0], where, f"history[{i}][0]")})
        messages.append({"role": "assistant", "content": _text(pair[1], where, f"history[{i}][1]")})
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": output}]
    return messages, None, [m["role"] == "assistant" for m in messages]


def _tools(raw: Any, where: str, field: str) -> list[dict[str, Any]] | None:
    """OpenAI `tools`; bare function specs (THUDM's data) are wrapped as {"type": "function", "function": spec}."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise DataError(f"{where}: field '{field}' must be a list of tools")
    tools = []
    for i, tool in enumerate(raw):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise DataError(f"{where}: field '{field}[{i}].name' is missing: every tool needs a function name")
        tools.append({"type": "function", "function": spec})
    return tools or None


def _chatglm3(row: dict, where: str):
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of turns")
    messages, trained = [], []
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{field}' must be an object with 'role' and 'content'")
        role = turn.get("role")
        if role not in _CHATGLM3_ROLES:
            raise DataError(f"{where}: field '{field}.role' is {role!r}; expected one of {', '.join(_CHATGLM3_ROLES)}")
        loss = turn.get("loss", True)
        if not isinstance(loss, bool):
            raise DataError(f"{where}: field '{field}.loss' must be true or false")
        if role == "tool":
            name, parameters = turn.get("name"), turn.get("parameters", {})
            if not isinstance(name, str) or not name:
                raise DataError(f"{where}: field '{field}.name' is missing: the tool being called")
            if not isinstance(parameters, dict):
                raise DataError(f"{where}: field '{field}.parameters' must be an object of arguments")
            if "observation" not in turn:
                raise DataError(f"{where}: field '{field}.observation' is missing: the tool's result")
            result = turn["observation"]
            call = {"type": "function", "function": {"name": name, "arguments": parameters}}
            messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "content": result if isinstance(result, str) else
                          json.dumps(result, ensure_ascii=False)}]
            trained += [loss, False]
            continue
        content = _text(turn.get("content"), where, f"{field}.content")
        messages.append({"role": "tool" if role == "observation" else role, "content": content})
        trained.append(role == "assistant" and loss)
    return messages, _tools(row.get("tools"), where, "tools"), trained


def _openai(row: dict, where: str):
    raw = row["messages"]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    messages, trained = [], []
    for i, m in enumerate(raw):
        field = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in _OPENAI_ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise DataError(f"{where}: field '{field}.role' is {role!r}; expected one of {', '.join(_OPENAI_ROLES)}")
        calls = m.get("tool_calls") or ([m["function_call"]] if m.get("function_call") else [])
        content = _text(m.get("content"), where, f"{field}.content", required=not (m["role"] == "assistant" and calls))
        weight = m.get("weight", 1)
        if weight not in (0, 1):
            raise DataError(f"{where}: field '{field}.weight' must be 0 or 1")
        message = {k: v for k, v in m.items() if k in ("role", "name", "tool_calls", "tool_call_id",
                                                     "function_call")}
        message["content"] = content
        messages.append(message)
        trained.append(m["role"] == "assistant" and weight == 1)
    tools = row.get("tools")
    if tools is None and row.get("functions") is not None:
        tools = row["functions"]
    return messages, _tools(tools, where, "tools"), trained
