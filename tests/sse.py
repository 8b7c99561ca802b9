"""A strict parser for the server's Server-Sent Events, shared by the fuzz and soak tests.

Strict where browsers and SDKs are lenient, so framing mistakes show up here first: the bytes must be UTF-8,
every line must be a `data:` field or a comment (sse-starlette's `: ping`), and the stream must end exactly at
the blank line that closes its last event.
"""

from __future__ import annotations

import json
import re

_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEError(AssertionError):
    pass


def parse_sse(raw: bytes) -> list[str]:
    """The `data` payloads of a complete event stream, in order (comments dropped)."""
    text = raw.decode("utf-8")  # strict: a character split by the server would raise here
    if not text:
        raise SSEError("empty stream")
    if not (text.endswith("\r\n\r\n") or text.endswith("\n\n") or text.endswith("\r\r")):
        raise SSEError(f"stream does not end with a blank line: {text[-40:]!r}")
    events, data = [], None
    for line in _LINE_END.split(text)[:-1]:  # the last split is the empty tail after the final line end
        if line == "":
            if data is not None:
                events.append(data)
            data = None
        elif line.startswith(":"):
            continue
        elif line.startswith("data: ") or line == "data":
            if data is not None:
                raise SSEError(f"two data lines in one event: {line[:80]!r}")  # the server never splits payloads
            data = line[6:]
        else:
            raise SSEError(f"unexpected line: {line[:80]!r}")
    return events


def chat_stream_payloads(raw: bytes) -> list[dict]:
    """The JSON chunks of a chat completion stream: the last event must be `[DONE]`, or an in-band error."""
    events = parse_sse(raw)
    if not events:
        raise SSEError("no events")
    payloads = [json.loads(e) for e in events[:-1]]
    if events[-1] != "[DONE]":
        last = json.loads(events[-1])
        if "error" not in last:
            raise SSEError(f"stream ends with neither [DONE] nor an error: {events[-1][:120]!r}")
        payloads.append(last)
    if "[DONE]" in events[:-1]:
        raise SSEError("events after [DONE]")
    return payloads


def responses_stream_events(raw: bytes) -> list[dict]:
    """The events of a /v1/responses stream, as strictly: each is an `event:` line naming the type of its one
    `data:` line (JSON), UTF-8 throughout, and the stream ends at the blank line closing its last event."""
    text = raw.decode("utf-8")
    if not text.endswith("\n\n") and not text.endswith("\r\n\r\n"):
        raise SSEError(f"stream does not end with a blank line: {text[-40:]!r}")
    events = []
    for block in _LINE_END.sub("\n", text).split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        if len(lines) != 2 or not lines[0].startswith("event: ") or not lines[1].startswith("data: "):
            raise SSEError(f"not one event line and one data line: {block[:120]!r}")
        payload = json.loads(lines[1][len("data: "):])
        if payload.get("type") != lines[0][len("event: "):]:
            raise SSEError(f"event {lines[0]!r} carries data of type {payload.get('type')!r}")
        events.append(payload)
    return events
