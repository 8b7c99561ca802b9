"""/v1/chat/completions: OpenAI request -> engine requests -> a ChatCompletion or SSE chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion_usage import CompletionUsage
from sse_starlette.sse import EventSourceResponse

from server.api.deps import Merged, adapter_for, chat_engine, queue_all, release, until_disconnected
from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, ChatMessage, ResponseFormat
from server.errors import EngineError
from server.types import ChatRequest, Finished, SamplingParams, TextDelta, TokenLogprob, ToolCallDelta

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    engine = chat_engine(request)
    adapter = adapter_for(engine, body.model)
    choices = to_engine_requests(body, adapter, request.state.request_id)
    # Off the event loop: tokenizing a long prompt takes ~0.6 s per MiB. Prompt errors surface as 400 here.
    prepared = await asyncio.to_thread(engine.prepare_choices, choices)
    meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or engine.models()[0].id,
                 legacy=bool(body.functions) and not body.tools)
    streams = await queue_all(engine, prepared)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_sse(meta, streams, prepared[0].prompt_tokens, include_usage),
                                   ping=15)  # each write is bounded by STREAM_SEND_TIMEOUT (middleware)
    try:
        results = await until_disconnected(request, asyncio.gather(*(_collect(s) for s in streams)))
    finally:
        await release(streams)
    return _completion(meta, results, prepared[0].prompt_tokens, bool(body.logprobs))


class _Meta:
    def __init__(self, id: str, created: int, model: str, legacy: bool):
        self.id, self.created, self.model, self.legacy = id, created, model, legacy


def to_engine_requests(body: ChatCompletionRequest, adapter: str, request_id: str) -> list[ChatRequest]:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    response_format = structured_format(body.response_format)
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    tool_choice: Any = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
    legacy = False
    if not tools and body.functions:
        legacy = True
        tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in body.functions]
        fc = body.function_call
        tool_choice = {"type": "function", "function": {"name": fc["name"]}} if isinstance(fc, dict) else fc
    check_tool_choice(tools, tool_choice)
    max_tokens = body.max_completion_tokens or body.max_tokens
    temperature = 1.0 if body.temperature is None else body.temperature
    if body.do_sample is False:
        temperature = 0.0  # zhipuai's switch for greedy decoding
    n = body.n or 1
    out = []
    for i in range(n):
        sampling = sampling_for(body, i, max_tokens=max_tokens, temperature=temperature, logprobs=logprobs)
        out.append(ChatRequest(messages, sampling, tools=tools, tool_choice=tool_choice, legacy_functions=legacy,
                               adapter=adapter, request_id=f"{request_id}/{i}" if n > 1 else request_id,
                               response_format=response_format))
    return out


def structured_format(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """response_format -> the spec the families compile (server/structured); "text" is no constraint."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format 'json_schema' needs json_schema.schema, a JSON Schema object.",
                       param="response_format")
    return {"type": "json_schema", "schema": fmt.json_schema.schema_, "strict": bool(fmt.json_schema.strict),
            "where": "response_format.json_schema.schema"}


def sampling_for(body, choice: int, *, max_tokens: int | None, temperature: float,
                 logprobs: int | None) -> SamplingParams:
    """One choice's sampling from the fields chat and legacy completions share."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        seed=None if body.seed is None else body.seed + choice,  # distinct but reproducible choices
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        logit_bias=body.logit_bias or {},
        logprobs=logprobs,
    )


def check_tool_choice(tools: list[dict[str, Any]] | None, tool_choice: Any) -> None:
    """A named function must be among the tools, and "required" needs one (chat and /v1/responses alike)."""
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if not tools or name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names function {name!r}, which is not in `tools`.", param="tool_choice")
    elif tool_choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs at least one tool in `tools`.", param="tool_choice")


def _message(m: ChatMessage, index: int) -> dict[str, Any]:
    if isinstance(m.content, list):
        parts = []
        for part in m.content:
            if part.type != "text":
                raise APIError(400, f"messages[{index}]: content part type '{part.type}' is not supported; "
                               "this model reads text only.", param=f"messages.{index}.content")
            parts.append(part.text or "")
        content: str | None = "".join(parts)
    else:
        content = m.content
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": content}
    if m.name:
        out["name"] = m.name
    calls = list(m.tool_calls or [])
    if m.function_call is not None:
        calls.append(type(calls[0])(function=m.function_call) if calls else _legacy_call(m))
    if calls:
        out["tool_calls"] = [
            {"id": c.id or f"call_{index}_{k}", "type": "function",
             "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for k, c in enumerate(calls)
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _legacy_call(m: ChatMessage):
    from server.api.protocol import ToolCall

    return ToolCall(function=m.function_call)


def _arguments(arguments: str | dict | None) -> str:
    if isinstance(arguments, dict):
        return json.dumps(arguments, ensure_ascii=False)
    return arguments or "{}"


async def _collect(stream: AsyncIterator) -> tuple[str, list[dict], Finished, list[TokenLogprob] | None]:
    text, calls, finished, logprobs = [], {}, None, None
    async for event in stream:
        if isinstance(event, TextDelta):
            text.append(event.text)
            if event.logprobs is not None:
                logprobs = (logprobs or []) + event.logprobs
        elif isinstance(event, ToolCallDelta):
            call = calls.setdefault(event.index, {"id": event.id, "name": event.name, "arguments": ""})
            call["arguments"] += event.arguments
        elif isinstance(event, Finished):
            finished = event
    return "".join(text), [calls[k] for k in sorted(calls)], finished, logprobs


def logprobs_content(entries: list[TokenLogprob]) -> list[dict]:
    """OpenAI's choices[].logprobs.content."""
    return [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
             "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, b, lp in e.top]} for e in entries]


def _completion(meta: _Meta, results, prompt_tokens: int, logprobs: bool) -> dict:
    choices = []
    for i, (text, calls, fin, entries) in enumerate(results):
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        reason = fin.reason
        if calls and meta.legacy:
            message["function_call"] = {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}
            reason = "function_call"
        elif calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
        choices.append({"index": i, "message": message, "finish_reason": reason,
                        "logprobs": {"content": logprobs_content(entries or [])} if logprobs else None})
    completion = sum(r[2].completion_tokens for r in results)
    return ChatCompletion(
        id=meta.id, object="chat.completion", created=meta.created, model=meta.model, choices=choices,
        usage=CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                              total_tokens=prompt_tokens + completion),
    ).model_dump(exclude_unset=True)


def _chunk(meta: _Meta, choices: list[dict], usage: CompletionUsage | None = None) -> str:
    chunk = ChatCompletionChunk(id=meta.id, object="chat.completion.chunk", created=meta.created, model=meta.model,
                                choices=choices, **({"usage": usage} if usage else {}))
    return chunk.model_dump_json(exclude_unset=True)


def _delta_for(meta: _Meta, event) -> dict:
    if isinstance(event, TextDelta):
        return {"content": event.text}
    if meta.legacy:
        fc = {"arguments": event.arguments}
        if event.name is not None:
            fc["name"] = event.name
        return {"function_call": fc}
    call: dict[str, Any] = {"index": event.index, "function": {"arguments": event.arguments}}
    if event.id is not None:
        call.update(id=event.id, type="function")
    if event.name is not None:
        call["function"]["name"] = event.name
    return {"tool_calls": [call]}


async def _sse(meta: _Meta, streams: list[AsyncIterator], prompt_tokens: int, include_usage: bool):
    """Merges the choices' event streams into OpenAI chunks; closing it cancels every choice."""
    choices = Merged(streams)
    try:
        for i in range(len(streams)):
            yield {"data": _chunk(meta, [{"index": i, "delta": {"role": "assistant", "content": ""}}])}
        done, completion_tokens = 0, 0
        while done < len(streams):
            index, event = await choices.get()
            if isinstance(event, EngineError):
                yield {"data": json.dumps(APIError.from_engine(event).body(), ensure_ascii=False)}
                return
            if isinstance(event, Finished):
                done += 1
                completion_tokens += event.completion_tokens
                reason = "function_call" if meta.legacy and event.reason == "tool_calls" else event.reason
                yield {"data": _chunk(meta, [{"index": index, "delta": {}, "finish_reason": reason}])}
                continue
            if isinstance(event, TextDelta) and event.logprobs is not None:
                choice = {"index": index, "delta": {"content": event.text} if event.text else {},
                          "logprobs": {"content": logprobs_content(event.logprobs)}}
                yield {"data": _chunk(meta, [choice])}
                continue
            if isinstance(event, TextDelta) and not event.text:
                continue
            yield {"data": _chunk(meta, [{"index": index, "delta": _delta_for(meta, event)}])}
        if include_usage:
            usage = CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                    total_tokens=prompt_tokens + completion_tokens)
            yield {"data": _chunk(meta, [], usage)}
        yield {"data": "[DONE]"}
    finally:
        await choices.aclose()  # also when the client went away (a cancellation)
