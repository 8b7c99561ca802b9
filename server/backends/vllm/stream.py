"""One sequence on vLLM: POST /inference/v1/generate with our prompt ids, its streamed token-id deltas -> our chunks.

The forced-prefix walk, the queue, cancel and the error mapping are the shared EngineStream's (child/stream.py).
Here: the request, a LoRA adapter by its vLLM name, logprobs (a forced token is sent to vLLM even where it is the
only way on when its logprobs are wanted: vLLM computes them), and the id that cancel posts to
/inference/v1/abort_requests, in case a proxy between us keeps the upstream connection open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from server.backends.base import GenerateRequest
from server.backends.child.client import sse_lines
from server.backends.child.stream import EngineStream
from server.backends.vllm.wire import (
    GENERATE_PATH,
    UpstreamError,
    choice_chunk,
    generate_body,
    parse_event,
    sampling_params,
)
from server.errors import EngineUnavailable

if TYPE_CHECKING:
    from server.backends.vllm.backend import VLLMBackend

_JSON = {"content-type": "application/json"}


class VLLMStream(EngineStream):
    _owner: VLLMBackend

    def __init__(self, owner: VLLMBackend, request: GenerateRequest, upstream_id: str, model: str | None):
        self._model = model
        super().__init__(owner, request, upstream_id)

    def _lone_needs_engine(self) -> bool:
        return self._request.sampling.logprobs is not None

    async def _pick(self, token_ids: list[int], allowed: list[int]) -> tuple[int, list | None]:
        """One token out of `allowed`, sampled by vLLM with the request's own settings."""
        req = self._request
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
            async for line in sse_lines(response):
                chunk = parse_event(line, req.sampling.logprobs)
                if chunk is not None and not finished:
                    self._put(chunk)
                    finished = chunk.finish_reason is not None
            # read to the end ([DONE]) so the connection goes back to the pool
        if not finished:
            raise EngineUnavailable("vLLM closed the stream before the sequence finished")
