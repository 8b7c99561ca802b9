"""/v1/responses: create (streamed as semantic SSE events or not), retrieve and delete stored responses.

The same road as chat completions: the request becomes a ChatRequest (responses_input.py), ChatService prepares
and queues it, and its events become a Response (responses_events.py). With `store` (the default) the response and
the conversation it ends are kept for `previous_response_id`, owned by the caller's API key (owner.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from server.api.deps import adapter_for, chat_engine, release, until_disconnected
from server.api.errors import APIError
from server.api.protocol import InputItem, ResponsesRequest
from server.api.responses_events import ResponseAssembler, new_id
from server.api.responses_input import check_supported, input_messages, items_to_messages, to_chat_request
from server.errors import EngineError, EngineOverloaded, PromptTooLong
from server.serving.responses_store import ResponseStore
from server.types import Finished

router = APIRouter()


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    engine = chat_engine(request)
    adapter = adapter_for(engine, body.model)
    check_supported(body)
    store, owner = _store(request), _owner(request)

    def prepare():  # a worker thread: SQLite reads and prompt tokenizing stay off the event loop
        history = []
        if body.previous_response_id:
            previous = store.get(owner, body.previous_response_id)
            if previous is None:
                raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                               param="previous_response_id", code="previous_response_not_found")
            history = previous.messages
        conversation = history + input_messages(body, lambda item_id: store.item(owner, item_id))
        chat = to_chat_request(body, conversation, adapter, request.state.request_id)
        try:
            return conversation, engine.prepare_choices([chat])[0]
        except PromptTooLong as exc:
            exc.param = "input"
            raise

    conversation, prepared = await asyncio.to_thread(prepare)
    stream = engine.chat(prepared)  # queues now: overload is a 429 before anything streams
    answer = ResponseAssembler(_echo(body, body.model or engine.models()[0].id))
    kept = _Keeper(store if body.store is not False else None, owner, conversation, answer)
    if body.stream:
        return EventSourceResponse(_sse(stream, answer, kept), ping=15)  # writes: STREAM_SEND_TIMEOUT (middleware)
    try:
        await until_disconnected(request, _drain(stream, answer))
    finally:
        await release([stream])
    await kept.save()
    return answer.response().model_dump(exclude_unset=True)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request, stream: bool = False):
    if stream:
        raise APIError(400, "Replaying a stored response as a stream is not supported.", param="stream")
    owner = _owner(request)
    stored = await asyncio.to_thread(_store(request).get, owner, response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored.response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    owner = _owner(request)
    if not await asyncio.to_thread(_store(request).delete, owner, response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses_store


def _owner(request: Request) -> str:
    return request.app.state.responses_owners.of(request)


def _not_found(response_id: str) -> APIError:
    # The same answer for an id that never existed, expired, or belongs to another key.
    return APIError(404, f"Response with id '{response_id}' not found.", param="response_id", code="not_found")


def _echo(body: ResponsesRequest, model: str) -> dict[str, Any]:
    """The request settings a Response repeats back."""
    tool_choice = body.tool_choice or "auto"
    return {
        "id": new_id("resp"), "object": "response", "created_at": int(time.time()), "model": model,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "tool_choice": tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(exclude_none=True),
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "text": {"format": _format(body)},
        "truncation": "disabled", "background": False,
        "service_tier": "default", "user": body.user,
    }


def _format(body: ResponsesRequest) -> dict[str, Any]:
    fmt = body.text.format if body.text else None
    if fmt is None:
        return {"type": "text"}
    out = fmt.model_dump(by_alias=True, exclude_none=True)
    if fmt.type == "json_schema":
        out.setdefault("name", "response")  # required in a Response's echo; a request may leave it out
    return out


class _Keeper:
    """Stores a finished answer with the conversation it ends (nothing for `store: false` or a failed answer)."""

    def __init__(self, store: ResponseStore | None, owner: str, conversation: list[dict], answer: ResponseAssembler):
        self.store, self.owner, self.conversation, self.answer = store, owner, conversation, answer

    async def save(self) -> None:
        if self.store is None or self.answer.state["status"] == "failed":
            return
        response = self.answer.response().model_dump(mode="json", exclude_unset=True)
        output = items_to_messages([InputItem.model_validate(item) for item in response["output"]])
        await asyncio.to_thread(self.store.put, self.owner, response, self.conversation + output)


async def _drain(stream: AsyncIterator, answer: ResponseAssembler) -> None:
    async for event in stream:
        if isinstance(event, Finished):
            answer.finish(event)
        else:
            answer.feed(event)


async def _sse(stream, answer: ResponseAssembler, kept: _Keeper):
    """The semantic events of one answer; closing it (a client that went away) cancels the generation."""
    try:
        for event in answer.start():
            yield _frame(event)
        try:
            async for event in stream:
                if isinstance(event, Finished):
                    events = answer.finish(event)
                    await kept.save()  # before response.completed goes out: a client may GET it right after
                else:
                    events = answer.feed(event)
                for out in events:
                    yield _frame(out)
        except Exception as exc:  # reported in-band: the status line went out with the first event
            message = exc.message if isinstance(exc, EngineError) else f"Generation failed: {exc}"
            code = "rate_limit_exceeded" if isinstance(exc, EngineOverloaded) else "server_error"
            for out in answer.fail(message, code):
                yield _frame(out)
    finally:
        await release([stream])


def _frame(event) -> dict[str, str]:
    return {"event": event.type, "data": event.model_dump_json(exclude_unset=True)}
