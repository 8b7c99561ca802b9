"""One sequence on an HTTP engine: a task that talks to the engine and feeds a queue; the consumer reads the queue.

The task starts when the sequence is submitted (so the n choices of a request reach the engine together), walks
the forced prefixes (prefix.py: a lone next token is appended without asking, a branch asks the engine for one
token among the allowed), then streams the rest. Whatever the consumer has not read yet is merged into one chunk
on the next read, so a slow reader costs one chunk, not one per token.

Cancelling cancels the task, which closes the HTTP stream (both engines abort a request whose client
disconnects), and asks the owner to abort the upstream request too where the engine has an abort call. A lost
connection is EngineUnavailable; the engine's own error inside the stream is EngineFailure. Nothing waits
unboundedly: reads time out after REQUEST_TIMEOUT of silence, and the backend fails every stream at once when
the engine goes down.

A subclass implements `_pick(token_ids, allowed)` (one token among `allowed` after `token_ids`, and its logprobs)
and `_stream(token_ids, max_tokens)` (generate, `_put` each chunk, the last one with its finish reason).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import httpx

from server.backends.base import GenerateRequest, TokenChunk
from server.backends.child.prefix import allowed_next
from server.errors import EngineError, EngineFailure, EngineUnavailable


class UpstreamError(Exception):
    """The engine reported an error inside a stream (its own generation failed)."""


class StreamOwner(Protocol):
    label: str
    read_timeout: float

    def _release(self, stream: EngineStream) -> None: ...

    def _abort_later(self, upstream_id: str) -> None: ...

    def connection_lost(self, exc: BaseException) -> EngineUnavailable: ...


class EngineStream:
    def __init__(self, owner: StreamOwner, request: GenerateRequest, upstream_id: str):
        if request.grammar is not None and request.forced_prefixes:  # the grammar would have to start after them
            raise EngineError(f"A grammar and forced prefixes together are not supported on {owner.label}.")
        self._owner = owner
        self._request = request
        self._id = upstream_id
        self._current: str | None = None  # the upstream request id in flight, for abort
        self._queue: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()
        self._held: BaseException | None = None
        self._final_queued = False  # a finish chunk or an error is in the queue: nothing more goes in
        self._done = False  # the consumer got the end
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{owner.label}-{upstream_id}")
        self._task.add_done_callback(lambda _: owner._release(self))
        self.forced_calls = 0  # engine calls spent on forced-prefix branches (measured in the tests)

    # -- consumer side -----------------------------------------------------------------------------
    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> TokenChunk:
        if self._done:
            raise StopAsyncIteration
        item, self._held = (self._held, None) if self._held is not None else (await self._queue.get(), None)
        if isinstance(item, BaseException):
            self._done = True
            raise item
        ids, finish, logprobs = list(item.token_ids), item.finish_reason, item.logprobs
        while finish is None and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if isinstance(nxt, BaseException):
                self._held = nxt  # the tokens before it go out first
                break
            ids += nxt.token_ids
            finish = nxt.finish_reason
            if nxt.logprobs is not None:
                logprobs = (logprobs or []) + nxt.logprobs
        self._done = finish is not None
        return TokenChunk(ids, finish, logprobs)

    def cancel(self) -> None:
        if self._final_queued:
            return
        self._put(TokenChunk([], "abort"))
        self._stop_upstream()

    async def aclose(self) -> None:
        self.cancel()
        self._done = True
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), 10.0)

    def fail(self, error: EngineError) -> None:
        """Called by the backend when the engine went down: the consumer gets `error` now."""
        if self._final_queued:
            return
        self._put(error)
        self._stop_upstream()

    def _stop_upstream(self) -> None:
        if not self._task.done():
            self._task.cancel()
            if self._current is not None:
                self._owner._abort_later(self._current)

    def _put(self, item: TokenChunk | BaseException) -> None:
        if self._final_queued:
            return
        if isinstance(item, BaseException) or item.finish_reason is not None:
            self._final_queued = True
            self._owner._release(self)  # the engine is done with it: the slot is free before [DONE] is even read
        self._queue.put_nowait(item)

    # -- the task ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        label = self._owner.label
        try:
            await self._generate()
        except asyncio.CancelledError:
            raise
        except EngineError as exc:
            self._put(exc)
        except UpstreamError as exc:
            self._put(EngineFailure(f"{label} failed this request: {exc}"))
        except httpx.TimeoutException:
            self._put(EngineUnavailable(f"{label} sent nothing for {self._owner.read_timeout:.0f} s "
                                        "(REQUEST_TIMEOUT)"))
        except (httpx.HTTPError, OSError) as exc:
            self._put(self._owner.connection_lost(exc))
        except Exception as exc:  # noqa: BLE001 - reported to this request, never lost
            self._put(EngineFailure(f"{label} backend error: {type(exc).__name__}: {exc}"))
        finally:
            self._current = None

    async def _generate(self) -> None:
        req = self._request
        out: list[int] = []
        if req.forced_prefixes:
            pending: list[int] = []
            while allowed := allowed_next(req.forced_prefixes, out):
                logprobs = None
                if len(allowed) == 1 and not self._lone_needs_engine():
                    token = allowed[0]  # the only way on: no need to ask the model
                else:
                    if pending:
                        self._put(TokenChunk(pending))
                        pending = []
                    self.forced_calls += 1
                    token, logprobs = await self._pick(req.prompt_ids + out, allowed)
                out.append(token)
                pending.append(token)
                finish = "stop" if token in req.stop_token_ids else "length" if len(out) >= req.max_tokens else None
                if logprobs is not None:  # one token per chunk: its logprobs go with it
                    self._put(TokenChunk(pending, finish, logprobs))
                    pending = []
                    if finish:
                        return
                    continue
                if finish:
                    self._put(TokenChunk(pending, finish))
                    return
            if pending:
                self._put(TokenChunk(pending))
        if req.max_tokens - len(out) <= 0:
            self._put(TokenChunk([], "length"))
            return
        await self._stream(req.prompt_ids + out, req.max_tokens - len(out))

    def _lone_needs_engine(self) -> bool:
        """Whether a forced token that is the only way on is still sent to the engine (for its logprobs)."""
        return False

    async def _pick(self, token_ids: list[int], allowed: list[int]) -> tuple[int, list | None]:
        """One token among `allowed` after `token_ids`, with its logprobs where the request asked for them."""
        raise NotImplementedError

    async def _stream(self, token_ids: list[int], max_tokens: int) -> None:
        raise NotImplementedError
