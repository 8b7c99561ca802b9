"""One answer's events as a Response: TextDelta / ToolCallDelta / Finished -> output items and the semantic stream.

Output items are a `message` with one `output_text` part for text, and a `function_call` per tool call, in the order
the model said them. Every stream event is the `openai` package's own type, numbered by `sequence_number`.
A non-streaming request runs the same assembler and keeps only the final Response, so the streamed deltas joined
equal the non-streamed text by construction.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from openai import BaseModel
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseFailedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)

from server.types import Finished, TextDelta, ToolCallDelta

# How an answer's finish reason ends the Response. "abort": the engine stopped it (not the client: then nobody
# is listening any more), so no complete answer exists.
_STATUS = {"stop": "completed", "tool_calls": "completed", "function_call": "completed", "length": "incomplete",
           "abort": "failed"}
_FINAL_EVENT = {"completed": ResponseCompletedEvent, "incomplete": ResponseIncompleteEvent,
                "failed": ResponseFailedEvent}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


class ResponseAssembler:
    def __init__(self, fields: dict[str, Any]):
        """`fields`: what the Response echoes of its request (id, created_at, model, instructions, tools, ...)."""
        self.fields = fields
        self.output: list[dict[str, Any]] = []  # the items so far; the last one may still be open
        self.state: dict[str, Any] = {"status": "in_progress", "error": None, "incomplete_details": None,
                                      "usage": None}
        self._open: str | None = None  # "message" or "function_call" while the last item is being written
        self._seq = -1

    def response(self) -> Response:
        return Response(**self.fields, **self.state, output=self.output)

    def start(self) -> list[BaseModel]:
        return [self._event(ResponseCreatedEvent, response=self.response()),
                self._event(ResponseInProgressEvent, response=self.response())]

    def feed(self, event: TextDelta | ToolCallDelta) -> list[BaseModel]:
        if isinstance(event, TextDelta):
            return self._text(event.text) if event.text else []
        if event.id is not None:  # the first delta of a call: a new item
            events = self._close("completed")
            self._open = "function_call"
            self.output.append({"id": new_id("fc"), "type": "function_call", "call_id": event.id,
                                "name": event.name or "", "arguments": "", "status": "in_progress"})
            events.append(self._event(ResponseOutputItemAddedEvent, output_index=self._index, item=self._last))
        else:
            events = []
        if event.arguments:
            self._last["arguments"] += event.arguments
            events.append(self._event(ResponseFunctionCallArgumentsDeltaEvent, item_id=self._last["id"],
                                      output_index=self._index, delta=event.arguments))
        return events

    def finish(self, finished: Finished) -> list[BaseModel]:
        status = _STATUS[finished.reason]
        events = self._close("incomplete" if status == "incomplete" else "completed")
        self.state.update(status=status, usage=_usage(finished))
        if status == "incomplete":
            self.state["incomplete_details"] = {"reason": "max_output_tokens"}
        if status == "failed":
            self.state["error"] = {"code": "server_error", "message": "The engine stopped generating this answer."}
        return events + self._final()

    def fail(self, message: str, code: str = "server_error") -> list[BaseModel]:
        """The answer broke off with an error: what was written so far, then response.failed."""
        events = self._close("incomplete")
        self.state.update(status="failed", error={"code": code, "message": message})
        return events + self._final()

    # ---- items ----------------------------------------------------------------------------------------------

    @property
    def _last(self) -> dict[str, Any]:
        return self.output[-1]

    @property
    def _index(self) -> int:
        return len(self.output) - 1

    def _text(self, text: str) -> list[BaseModel]:
        events = []
        if self._open != "message":
            events += self._close("completed")
            self._open = "message"
            self.output.append({"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                                "content": []})
            events.append(self._event(ResponseOutputItemAddedEvent, output_index=self._index, item=self._last))
            self._last["content"].append({"type": "output_text", "text": "", "annotations": []})
            events.append(self._event(ResponseContentPartAddedEvent, item_id=self._last["id"], output_index=self._index,
                                      content_index=0, part=self._last["content"][0]))
        self._last["content"][0]["text"] += text
        events.append(self._event(ResponseTextDeltaEvent, item_id=self._last["id"], output_index=self._index,
                                  content_index=0, delta=text, logprobs=[]))
        return events

    def _close(self, status: str) -> list[BaseModel]:
        """The `...done` events of the open item, if any."""
        kind, self._open = self._open, None
        if kind is None:
            return []
        item, where = self._last, {"item_id": self._last["id"], "output_index": self._index}
        if kind == "message":
            part = item["content"][0]
            events = [self._event(ResponseTextDoneEvent, **where, content_index=0, text=part["text"], logprobs=[]),
                      self._event(ResponseContentPartDoneEvent, **where, content_index=0, part=part)]
        else:
            events = [self._event(ResponseFunctionCallArgumentsDoneEvent, **where, arguments=item["arguments"])]
        item["status"] = status
        return events + [self._event(ResponseOutputItemDoneEvent, output_index=self._index, item=item)]

    def _final(self) -> list[BaseModel]:
        self.fields["completed_at"] = int(time.time()) if self.state["status"] == "completed" else None
        return [self._event(_FINAL_EVENT[self.state["status"]], response=self.response())]

    def _event(self, cls: type[BaseModel], **fields) -> BaseModel:
        # Built now, from copies: the items keep growing after an event about them has been sent.
        self._seq += 1
        return cls(type=cls.model_fields["type"].annotation.__args__[0], sequence_number=self._seq, **fields)


def _usage(finished: Finished) -> dict[str, Any]:
    return {"input_tokens": finished.prompt_tokens, "output_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}
