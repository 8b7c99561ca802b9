"""One sequence on llama-server: POST /completion with our prompt ids, its streamed tokens -> our chunks.

The forced-prefix walk, the queue, cancel and the error mapping are the shared EngineStream's. Here: the request,
ending the sequence on our own stop ids and at max_tokens (both by closing the stream, which makes llama-server
cancel the slot's task), the ids llama-server held back inside a UTF-8 character (wire.recover_held), and a
structured output's grammar as GBNF (gbnf.py) with the control tokens that are not stop ids banned, and the
request's LoRA adapter by its scale (the backend's lora_field).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from server.backends.base import TokenChunk
from server.backends.child.client import sse_lines
from server.backends.child.stream import EngineStream, UpstreamError
from server.backends.llamacpp.gbnf import to_gbnf
from server.backends.llamacpp.wire import COMPLETION_PATH, HOLD_MARGIN, completion_body, parse_event, recover_held
from server.errors import EngineUnavailable

if TYPE_CHECKING:
    from server.backends.llamacpp.backend import LlamaCppBackend

_JSON = {"content-type": "application/json"}


class LlamaStream(EngineStream):
    _owner: LlamaCppBackend

    async def _pick(self, token_ids: list[int], allowed: list[int]) -> tuple[int, None]:
        """One token out of `allowed`, sampled by llama.cpp with the request's own settings (a large logit bias on
        the allowed ids keeps their relative scores and puts every other id out of reach)."""
        body = completion_body(token_ids, self._request.sampling, n_predict=1, stream=False,
                               context=self._owner.context_length, allowed=allowed,
                               lora=self._owner.lora_field(self._request.adapter))
        response = await self._owner.client.post(self._owner.url(COMPLETION_PATH), content=body, headers=_JSON)
        if response.status_code != 200:
            raise self._owner.http_error(response.status_code, response.content)
        tokens = orjson.loads(response.content).get("tokens") or []
        if len(tokens) != 1 or tokens[0] not in allowed:
            raise UpstreamError(f"asked for one of {allowed}, got {tokens}")
        return tokens[0], None  # no logprobs on this engine (a 400 before this)

    async def _stream(self, token_ids: list[int], max_tokens: int) -> None:
        req, owner = self._request, self._owner
        stops = req.stop_token_ids
        margin = max(0, min(HOLD_MARGIN, owner.context_length - len(token_ids) - max_tokens))
        grammar = banned = None
        if req.grammar is not None:  # translated in prepare_grammar already: a cache lookup
            grammar = to_gbnf(req.grammar)
            banned = tuple(t for t in owner.vocab.control if t not in stops)
        body = completion_body(token_ids, req.sampling, n_predict=max_tokens + margin, stream=True,
                               context=owner.context_length, grammar=grammar, banned=banned or (),
                               lora=owner.lora_field(req.adapter))
        sent = 0  # ids passed on (held-back ones included once recovered)
        async with owner.client.stream("POST", owner.url(COMPLETION_PATH), content=body, headers=_JSON) as response:
            if response.status_code != 200:
                raise owner.http_error(response.status_code, await response.aread())
            async for line in sse_lines(response):
                event = parse_event(line)
                if event is None:
                    continue
                ids = list(event.get("tokens") or [])
                predicted = int(event.get("tokens_predicted") or sent + len(ids))
                held = predicted - sent - len(ids)
                if held > 0 and ids:
                    ids = recover_held(owner.vocab, event.get("content") or "", ids[0], held) + ids
                ids = ids[: max_tokens - sent]
                for i, token in enumerate(ids):
                    if token in stops:  # ours ends the answer here, whether or not llama.cpp knows it as one
                        self._put(TokenChunk(ids[: i + 1], "stop"))
                        return  # leaving the block closes the stream: llama-server cancels the slot's task
                sent += len(ids)
                if sent >= max_tokens:
                    self._put(TokenChunk(ids, "length"))
                    return
                if event.get("stop"):
                    self._put(TokenChunk(ids, _finish(event)))
                    return
                if ids:
                    self._put(TokenChunk(ids))
        raise EngineUnavailable("llama-server closed the stream before the sequence finished")


def _finish(event: dict) -> str:
    kind = event.get("stop_type")
    if kind == "eos":
        return "stop"  # one of the model's own end-of-generation tokens (its id came in the event before)
    if kind == "limit":
        return "length"  # the slot's context ran out before max_tokens
    raise UpstreamError(f"llama-server ended the sequence with stop_type {kind!r}")
