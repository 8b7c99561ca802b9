"""A /v1/responses request in chat terms: input items -> OpenAI chat messages, plus tools, tool_choice and sampling.

The messages then take the same road as /v1/chat/completions, so a family renders them with the same code (for
ChatGLM3: `function_call` items become its assistant tool-call turns and `function_call_output` its observation
turns, token for token). What this server cannot honour is a 400 naming the field, never silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from server.api.chat import check_tool_choice
from server.api.errors import APIError
from server.api.protocol import ContentPart, InputItem, ResponsesRequest, ResponsesToolChoice
from server.types import ChatRequest, SamplingParams

# Fields OpenAI defines that would change the answer in ways this server cannot deliver, with the values that mean
# "off" (accepted) and why anything else is refused.
_UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "background": ((False,), "background responses are not supported; stream the response instead"),
    "background_options": ((), "background responses are not supported"),
    "context_management": ((), "server-side context compaction is not supported"),
    "conversation": ((), "the Conversations API is not served here; continue with `previous_response_id`"),
    "max_tool_calls": ((), "`max_tool_calls` is not supported"),
    "moderation": ((), "moderation is not supported"),
    "prompt": ((), "stored prompt templates are not supported; send `instructions` and `input`"),
    "top_logprobs": ((0,), "logprobs are not supported"),
    "truncation": (("disabled",), "truncation 'auto' is not supported: a conversation longer than the context "
                   "is a 400"),
}
_TEXT_PARTS = {"input_text", "output_text"}

FindItem = Callable[[str], dict[str, Any] | None]


def check_supported(body: ResponsesRequest) -> None:
    for name, (off, why) in _UNSUPPORTED.items():
        value = getattr(body, name)
        if value is not None and value not in off:
            raise APIError(400, f"`{name}`: {why}.", param=name)
    if body.reasoning and (body.reasoning.effort not in (None, "none") or body.reasoning.summary):
        raise APIError(400, "`reasoning` is not supported: this model does not reason before it answers.",
                       param="reasoning")
    if "message.output_text.logprobs" in (body.include or []):
        # Other `include` values ask for extras of items this server never produces: nothing to add.
        raise APIError(400, "`include`: logprobs are not supported.", param="include")
    kind = body.text.format.type if body.text and body.text.format else "text"
    if kind not in ("text", "json_schema", "json_object"):
        raise APIError(400, f"text.format '{kind}' is not supported; use 'text', 'json_object' or 'json_schema'.",
                       param="text.format")


def text_format(body: ResponsesRequest) -> dict[str, Any] | None:
    """`text.format` -> the structured-output spec chat's response_format becomes (server/structured)."""
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise APIError(400, "text.format 'json_schema' needs `schema`, a JSON Schema object.", param="text.format")
    return {"type": "json_schema", "schema": fmt.schema_, "strict": bool(fmt.strict), "where": "text.format.schema"}


def to_chat_request(body: ResponsesRequest, messages: list[dict[str, Any]], adapter: str,
                    request_id: str) -> ChatRequest:
    """`messages`: the history and this input as chat messages; `instructions` go in front (they are not kept
    for the next turn, as with OpenAI)."""
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if not messages:
        raise APIError(400, "`input` is empty: there is nothing to answer.", param="input")
    tools, tool_choice = chat_tools(body)
    sampling = SamplingParams(max_tokens=body.max_output_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p)
    return ChatRequest(system + messages, sampling, tools=tools, tool_choice=tool_choice, adapter=adapter,
                       request_id=request_id, response_format=text_format(body))


def chat_tools(body: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """Function tools and tool_choice in the chat layout (`strict` is kept; ChatGLM3's prompt leaves it out)."""
    tools = []
    for i, tool in enumerate(body.tools or []):
        if tool.type != "function":
            raise APIError(400, f"tools[{i}]: '{tool.type}' tools (built-in tools such as web search) are not "
                           "supported; only function tools.", param=f"tools.{i}.type")
        if not tool.name:
            raise APIError(400, f"tools[{i}] needs a `name`.", param=f"tools.{i}.name")
        function = tool.model_dump(include={"name", "description", "parameters", "strict"}, exclude_none=True)
        tools.append({"type": "function", "function": function})
    choice: Any = body.tool_choice
    if isinstance(choice, ResponsesToolChoice):
        if choice.type == "function":
            choice = {"type": "function", "function": {"name": choice.name}}
        elif choice.type == "allowed_tools":  # a subset of `tools`, in "auto" or "required" mode
            allowed = {t.get("name") for t in choice.tools or [] if t.get("type") == "function"}
            if len(allowed) != len(choice.tools or []) or not allowed <= {t["function"]["name"] for t in tools}:
                raise APIError(400, "tool_choice.tools must name function tools from `tools`.",
                               param="tool_choice.tools")
            tools = [t for t in tools if t["function"]["name"] in allowed]
            choice = choice.mode or "auto"
        else:
            raise APIError(400, f"tool_choice type '{choice.type}' is not supported; use 'none', 'auto', 'required', "
                           "a function or allowed_tools.", param="tool_choice.type")
    check_tool_choice(tools, choice)
    return tools or None, choice


def input_messages(body: ResponsesRequest, find_item: FindItem) -> list[dict[str, Any]]:
    """`input` as chat messages; `item_reference`s are looked up with `find_item` (the caller's stored items)."""
    if body.input is None:
        return []
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    return items_to_messages(body.input, find_item)


def items_to_messages(items: Sequence[InputItem], find_item: FindItem | None = None) -> list[dict[str, Any]]:
    """Input items, or a Response's own output items, as chat messages: calls join the assistant turn before them,
    so a message followed by its function calls is one assistant message with `tool_calls`, as in chat."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.type or ("message" if item.role else "item_reference" if item.id else None)
        if kind == "item_reference":
            stored = find_item(item.id) if find_item and item.id else None
            if stored is None:
                raise APIError(404, f"Item with id '{item.id}' not found.", param=f"input.{i}.id",
                               code="item_not_found")
            item = InputItem.model_validate(stored)
            kind = item.type
        if kind == "message":
            if item.role is None:
                raise APIError(400, f"input[{i}] needs a `role`.", param=f"input.{i}.role")
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": _text(item.content, f"input.{i}.content")})
        elif kind == "function_call":
            if not item.call_id or not item.name:
                raise APIError(400, f"input[{i}]: a function_call needs `call_id` and `name`.", param=f"input.{i}")
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not item.call_id:
                raise APIError(400, f"input[{i}]: a function_call_output needs `call_id`.",
                               param=f"input.{i}.call_id")
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": _text(item.output, f"input.{i}.output")})
        else:
            raise APIError(400, f"input[{i}]: items of type '{kind}' are not supported; send messages, "
                           "function_call and function_call_output items.", param=f"input.{i}.type")
    return out


def _text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type == "refusal":
            texts.append(part.refusal or "")
        elif part.type in _TEXT_PARTS:
            texts.append(part.text or "")
        else:
            raise APIError(400, f"{where}.{j}: '{part.type}' content is not supported; this model reads text only.",
                           param=f"{where}.{j}")
    return "".join(texts)
