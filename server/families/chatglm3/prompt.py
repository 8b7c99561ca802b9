"""ChatGLM3 prompts: THUDM's `build_chat_input` rule, and OpenAI messages/tools translated into it.

The rule: `[gMASK, sop]`, then per message `<|role|>` + encode(metadata + "\\n") + encode(content), then
`<|assistant|>`. A system message carrying `tools` gets `"\\n" + json.dumps(tools, indent=4, ensure_ascii=False)`
appended to its content. Every piece of text goes through plain sentencepiece, so special-token text written by a
client stays text: there is no way to inject a role token through content.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.errors import EngineError
from server.families.base import flatten_tools
from server.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from server.families.chatglm3.tools import render_tool_call

# The system prompt THUDM's openai_api_demo and finetune data put in front of the tool list.
DEFAULT_TOOL_SYSTEM_PROMPT = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)


def build_messages(
    tokenizer: ChatGLM3Tokenizer, messages: Sequence[dict[str, Any]], metadata: str | None = None
) -> list[int]:
    """Prompt ids for official-format messages ({role, content, metadata?, tools?}), ready to generate.

    `metadata` (a tool name) is appended after the final `<|assistant|>`, which makes the model call that tool.
    """
    ids = tokenizer.prefix_tokens()
    for item in messages:
        ids += message_ids(tokenizer, item)
    ids.append(tokenizer.assistant_token_id)
    if metadata is not None:
        ids += tokenizer.sp_encode(f"{metadata}\n")
    return ids


def message_ids(tokenizer: ChatGLM3Tokenizer, item: dict[str, Any]) -> list[int]:
    """The ids of one official-format message inside a prompt (fine-tuning encodes rows with it too)."""
    content = item["content"]
    if item["role"] == "system" and "tools" in item:
        content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
    return tokenizer.build_single_message(item["role"], item.get("metadata", ""), content)


def build_chat_input(tokenizer: ChatGLM3Tokenizer, query: str, history=None, role: str = "user") -> list[int]:
    """The ids of the original `tokenizer.build_chat_input(query, history, role)["input_ids"][0]`."""
    return build_messages(tokenizer, [*(history or []), {"role": role, "content": query}])


@dataclass
class ChatGLM3Conversation:
    """An OpenAI request in ChatGLM3's terms."""

    messages: list[dict[str, Any]]
    tool_names: list[str] = field(default_factory=list)  # tools offered in the system turn
    forced_tool: str | None = None  # metadata appended after the final <|assistant|>
    must_call: bool = False  # tool_choice "required" with several tools: the answer must start with a tool's name


def from_openai(
    messages: Sequence[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
) -> ChatGLM3Conversation:
    """Translate OpenAI chat messages, `tools`/`functions` and `tool_choice`; EngineError for what has no form."""
    if not messages:
        raise EngineError("messages must not be empty", param="messages")
    functions = [_function_spec(f) for f in flatten_tools(tools)]
    names = [f["name"] for f in functions]
    offered, forced = _choose_tools(functions, names, tool_choice)
    must_call = tool_choice == "required" and forced is None

    out: list[dict[str, Any]] = []
    rest = list(messages)
    if offered:
        # The tool list lives in the system turn; the client's own system prompt keeps its words.
        system = DEFAULT_TOOL_SYSTEM_PROMPT
        if rest[0].get("role") in ("system", "developer"):
            system = _text(rest.pop(0).get("content"), "messages[0].content")
        out.append({"role": "system", "content": system, "tools": offered})
    for i, message in enumerate(rest):
        out += _translate(message, i + len(messages) - len(rest))
    return ChatGLM3Conversation(out, [f["name"] for f in offered], forced, must_call)


def _translate(message: dict[str, Any], i: int) -> list[dict[str, Any]]:
    role = message.get("role")
    content = _text(message.get("content"), f"messages[{i}].content")
    if role in ("system", "developer", "user"):
        return [{"role": "system" if role == "developer" else role, "content": content}]
    if role in ("tool", "function"):
        return [{"role": "observation", "content": content}]
    if role != "assistant":
        raise EngineError(f"messages[{i}].role {role!r} is not supported by ChatGLM3", param=f"messages[{i}].role")
    calls = [c.get("function", c) for c in message.get("tool_calls") or []]
    if message.get("function_call"):
        calls.append(message["function_call"])
    if not calls:
        return [{"role": "assistant", "metadata": "", "content": content}]
    # Words said before the calls, then one assistant turn per call: the layout ChatGLM3 produces itself.
    turns = [{"role": "assistant", "metadata": "", "content": content}] if content.strip() else []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        name, arguments = call.get("name"), _arguments(call.get("arguments"), where)
        if not isinstance(name, str) or not name or "\n" in name:
            raise EngineError(f"{where} needs a one-line function name", param=where)
        try:
            rendered = render_tool_call(name, arguments)
        except (TypeError, ValueError) as e:
            raise EngineError(f"{where}.function.arguments cannot be rendered: {e}", param=where) from e
        turns.append({"role": "assistant", "metadata": name, "content": rendered})
    return turns


def _choose_tools(functions, names, tool_choice) -> tuple[list[dict[str, Any]], str | None]:
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function", tool_choice)  # {"type": "function", ...} or legacy {"name": ...}
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise EngineError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return functions, name
    if tool_choice == "none":
        return [], None
    if tool_choice == "auto":
        return functions, None
    if tool_choice == "required":
        if not functions:
            raise EngineError('tool_choice "required" needs at least one tool', param="tool_choice")
        # One tool: force it. Several: the model chooses which, but its metadata line is constrained to a tool
        # name (ChatGLM3Conversation.must_call).
        return functions, names[0] if len(names) == 1 else None
    raise EngineError(f"unsupported tool_choice {tool_choice!r}", param="tool_choice")


def _function_spec(function: dict[str, Any]) -> dict[str, Any]:
    """name/description/parameters in the order ChatGLM3 saw in training (OpenAI extras such as `strict` dropped)."""
    name = function.get("name")
    if not isinstance(name, str) or not name or "\n" in name:
        raise EngineError("every tool needs a one-line function name", param="tools")
    return {k: function[k] for k in ("name", "description", "parameters") if k in function}


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EngineError(f"{where}.function.arguments is not valid JSON: {e}", param=where) from e
    if not isinstance(raw, dict):
        raise EngineError(f"{where}.function.arguments must be a JSON object", param=where)
    return raw


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    raise EngineError(f"{where}: ChatGLM3 takes text content only", param=where)
