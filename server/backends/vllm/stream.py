"""One sequence on vLLM: a task that talks to vLLM and feeds a queue; the consumer iterates the queue.

The task starts when the sequence is submitted (so the n choices of a request reach vLLM together), walks the
forced prefixes (prefix.py), then streams POST /inference/v1/generate. Whatever the consumer has not read yet is
merged into one chunk on the next read, so a slow reader costs one chunk, not one per token.

Cancelling closes the HTTP stream (vLLM aborts a request whose client disconnects) and also posts
/inference/v1/abort_requests, in case a proxy between us keeps the upstream connection open. A lost connection
is EngineUnavailable; vLLM's own error inside the stream is EngineFailure. Nothing waits unboundedly: reads time
out after REQUEST_TIMEOUT of silence, and the backend fails every stream at once when vLLM goes down.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import httpx
import orjson

from server.backends.base import GenerateRequest, TokenChunk
from server.backends.child.prefix import allowed_next
from server.backends.vllm.wire import (
    GENERATE_PATH,
    UpstreamError,
    choice_chunk,
    generate_body,
    parse_event,
    sampling_params,
)
from server.errors import EngineError, EngineFailure, EngineUnavailable

if TYPE_CHECKING:
    from server.backends.vllm.backend import VLLMBackend

_JSON = {"content-type": "application/json"}


class VLLMStream:
    def __init__(self, owner: VLLMBackend, request: GenerateRequest, upstream_id: str, model: str | None):
        self._owner = owner
        self._request = request
        self._id = upstream_id
        self._model = model
        self._current: str | None = None  # the vLLM request id in flight, for abort
        self._queue: asyncio.Queue[TokenChunk | BaseException] = asyncio.Queue()
        self._held: BaseException | None = None
        self._final_queued = False  # a finish chunk or an error is in the queue: nothing more goes in
        self._done = False  # the consumer got the end
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"vllm-{upstream_id}")
        self._task.add_done_callback(lambda _: owner._release(self))
        self.forced_calls = 0  # vLLM calls spent on forced-prefix branches (measured in the tests)

    # -- consumer side -----------------------------------------------------------------------------
    def __aiter__(self) -> VLLMStream:
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
        """Called by the backend when vLLM went down: the consumer gets `error` now."""
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
            self._owner._release(self)  # vLLM is done with it: the slot is free before [DONE] is even read
        self._queue.put_nowait(item)

    # -- the task ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._generate()
        except asyncio.CancelledError:
            raise
        except EngineError as exc:
            self._put(exc)
        except UpstreamError as exc:
            self._put(EngineFailure(f"vLLM failed this request: {exc}"))
        except httpx.TimeoutException:
            self._put(EngineUnavailable(f"vLLM sent nothing for {self._owner.read_timeout:.0f} s (REQUEST_TIMEOUT)"))
        except (httpx.HTTPError, OSError) as exc:
            self._put(self._owner.connection_lost(exc))
        except Exception as exc:  # noqa: BLE001 - reported to this request, never lost
            self._put(EngineFailure(f"vLLM backend error: {type(exc).__name__}: {exc}"))
        finally:
            self._current = None

    async def _generate(self) -> None:
        req = self._request
        out: list[int] = []
        if req.forced_prefixes and req.grammar is not None:  # the grammar would have to start after the prefix
            raise EngineError("A grammar and forced prefixes together are not supported on vLLM.")
        if req.forced_prefixes:
            pending: list[int] = []
            while allowed := allowed_next(req.forced_prefixes, out):
                logprobs = None
                if len(allowed) == 1 and req.sampling.logprobs is None:
                    token = allowed[0]  # the only way on: no need to ask the model
                else:  # (also for the only way on when its logprobs are wanted: vLLM computes them)
                    if pending:
                        self._put(TokenChunk(pending))
                        pending = []
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

    async def _pick(self, token_ids: list[int], allowed: list[int]) -> tuple[int, list | None]:
        """One token out of `allowed`, sampled by vLLM with the request's own settings."""
        req = self._request
        self.forced_calls += 1
        self._current = upstream_id = f"{self._id}-p{self.forced_calls}"
        params = sampling_params(req.sampling, max_tokens=1, stop_token_ids=req.stop_token_ids,
                                 allowed_token_ids=allowed)
        body = generate_body(upstream_id, token_ids, params, model=self._model, stream=False)
        response = await self._owner.client.post(self._owner.url(GENERATE_PATH), content=body, headers=_JSON)
        if response.status_code != 200:
            raise self._owner.http_error(response.status_code, response.content)
        chunk = choice_chunk(orjson.loads(response.content)["choices"][0], req.sampling.logprobs)
        if len(chunk.token_ids) != 1 or chunk.token_ids[0] not in allowed:
            raise UpstreamError(f"asked for one of {allowed}, got {chunk.token_ids}")
        return chunk.token_ids[0], chunk.logprobs

    async def _stream(self, token_ids: list[int], max_tokens: int) -> None:
        req = self._request
        self._current = self._id
        params = sampling_params(req.sampling, max_tokens=max_tokens, stop_token_ids=req.stop_token_ids,
                                 grammar=req.grammar)
        body = generate_body(self._id, token_ids, params, model=self._model, stream=True)
        async with self._owner.client.stream("POST", self._owner.url(GENERATE_PATH), content=body,
                                             headers=_JSON) as response:
            if response.status_code != 200:
                raise self._owner.http_error(response.status_code, await response.aread())
            finished = False
            async for line in response.aiter_lines():
                chunk = parse_event(line, req.sampling.logprobs)
                if chunk is not None and not finished:
                    self._put(chunk)
                    finished = chunk.finish_reason is not None
            # read to the end ([DONE]) so the connection goes back to the pool
        if not finished:
            raise EngineUnavailable("vLLM closed the stream before the sequence finished")
