"""/v1/completions (legacy): raw prompts -> ChatService's raw-prompt road -> an openai Completion or SSE chunks.

No chat template: a string prompt is encoded as the model's own tokenizer does it (for ChatGLM3 `[gMASK, sop]` and
sentencepiece, as THUDM's `tokenizer.encode`), a token-id prompt is taken as it is. The n choices of every prompt,
limits, stop strings, seeds, usage, metrics, 429 and cancellation are the chat road's (ChatService).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from openai.types import Completion
from openai.types.completion_usage import CompletionUsage
from sse_starlette.sse import EventSourceResponse

from server.api.chat import sampling_for
from server.api.deps import Merged, adapter_for, chat_engine, queue_all, release, until_disconnected
from server.api.errors import APIError
from server.api.protocol import CompletionRequest as CompletionBody
from server.errors import EngineError
from server.types import CompletionRequest, Finished, TextDelta, TokenLogprob

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(body: CompletionBody, request: Request):
    engine = chat_engine(request)
    adapter = adapter_for(engine, body.model)
    check_supported(body)
    prompts = _prompt_list(body.prompt)
    # Off the event loop: tokenizing long prompts takes a while. A prompt that does not fit is a 400 here.
    prepared, echoes, prompt_tokens = await asyncio.to_thread(
        _prepare, engine, body, prompts, adapter, request.state.request_id)
    meta = _Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or engine.models()[0].id)
    n = body.n or 1
    echo = [echoes[i // n] if body.echo else "" for i in range(len(prepared))]
    streams = await queue_all(engine, prepared)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventSourceResponse(_sse(meta, streams, echo, prompt_tokens, include_usage), ping=15)
    try:
        results = await until_disconnected(request, asyncio.gather(*(_collect(s) for s in streams)))
    finally:
        await release(streams)
    completion_tokens = sum(fin.completion_tokens for _, _, fin in results)
    choices = [{"index": i, "text": echo[i] + text, "finish_reason": _finish(fin.reason),
                "logprobs": legacy_logprobs(entries, len(echo[i])) if body.logprobs is not None else None}
               for i, (text, entries, fin) in enumerate(results)]
    return Completion(
        id=meta.id, object="text_completion", created=meta.created, model=meta.model, choices=choices,
        usage=_usage(prompt_tokens, completion_tokens),
    ).model_dump(exclude_unset=True)


def check_supported(body: CompletionBody) -> None:
    """What this endpoint does not do gets a 400 naming the field, never a silently different answer."""
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported by this server; send the text before "
                       "the gap as the prompt.", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise APIError(400, "best_of other than n is not supported (the server does not rank candidates); "
                       "leave best_of out or set it equal to n.", param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs (the prompt's own logprobs) is not supported; ask for one or the "
                       "other.", param="logprobs")


class _Meta:
    def __init__(self, id: str, created: int, model: str):
        self.id, self.created, self.model = id, created, model


def _prompt_list(prompt) -> list[str | list[int]]:
    """The request's prompts: a string, a list of strings, one token-id list or a list of them."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


def _prepare(engine, body: CompletionBody, prompts, adapter: str, request_id: str):
    """Encode and size every prompt, and its n choices (blocking: runs in a worker thread)."""
    n = body.n or 1
    temperature = 1.0 if body.temperature is None else body.temperature
    prepared, echoes, prompt_tokens = [], [], 0
    for p, prompt in enumerate(prompts):
        ids = engine.encode_raw(prompt) if isinstance(prompt, str) else prompt
        echoes.append(prompt if isinstance(prompt, str) else engine.family.decode(ids))
        prompt_tokens += len(ids)
        for i in range(n):
            sampling = sampling_for(body, i, max_tokens=body.max_tokens, temperature=temperature,
                                    logprobs=body.logprobs)
            rid = request_id if len(prompts) * n == 1 else f"{request_id}/{p * n + i}"
            try:
                prepared.append(engine.prepare_raw(CompletionRequest(ids, sampling, adapter, rid)))
            except EngineError as exc:
                if len(prompts) > 1:  # say which prompt
                    exc.message, exc.param = f"prompt[{p}]: {exc.message}", f"prompt.{p}"
                elif exc.param == "messages":
                    exc.param = "prompt"
                raise
    return prepared, echoes, prompt_tokens


async def _collect(stream) -> tuple[str, list[TokenLogprob], Finished]:
    text, entries, finished = [], [], None
    async for event in stream:
        if isinstance(event, TextDelta):
            text.append(event.text)
            entries += event.logprobs or []
        elif isinstance(event, Finished):
            finished = event
    return "".join(text), entries, finished


def legacy_logprobs(entries: list[TokenLogprob], base: int) -> dict:
    """The legacy shape: parallel lists; each top dict holds the k most likely and always the sampled token."""
    tops = []
    for e in entries:
        top = {token: lp for token, _, lp in e.top}
        top.setdefault(e.token, e.logprob)
        tops.append(top)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": [base + e.offset for e in entries]}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> CompletionUsage:
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)


def _chunk(meta: _Meta, choices: list[dict], usage: CompletionUsage | None = None) -> str:
    # A streamed choice has finish_reason null until its last chunk, which the SDK's type (made for the whole
    # answer) does not allow: built unvalidated, as the SDK itself reads stream chunks.
    chunk = Completion.model_construct(id=meta.id, object="text_completion", created=meta.created,
                                       model=meta.model, choices=choices, **({"usage": usage} if usage else {}))
    return chunk.model_dump_json(exclude_unset=True, warnings=False)


async def _sse(meta: _Meta, streams: list, echo: list[str], prompt_tokens: int, include_usage: bool):
    """Merges the choices' event streams into text_completion chunks; closing it cancels every choice."""
    offsets = [len(e) for e in echo]  # text_offset counts from the start of the returned text
    choices = Merged(streams)
    try:
        for i, text in enumerate(echo):
            if text:
                yield {"data": _chunk(meta, [{"index": i, "text": text, "logprobs": None, "finish_reason": None}])}
        done, completion_tokens = 0, 0
        while done < len(streams):
            index, event = await choices.get()
            if isinstance(event, EngineError):
                yield {"data": json.dumps(APIError.from_engine(event).body(), ensure_ascii=False)}
                return
            if isinstance(event, Finished):
                done += 1
                completion_tokens += event.completion_tokens
                choice = {"index": index, "text": "", "logprobs": None, "finish_reason": _finish(event.reason)}
                yield {"data": _chunk(meta, [choice])}
                continue
            if not isinstance(event, TextDelta) or (not event.text and event.logprobs is None):
                continue
            logprobs = legacy_logprobs(event.logprobs, offsets[index]) if event.logprobs is not None else None
            yield {"data": _chunk(meta, [{"index": index, "text": event.text, "logprobs": logprobs,
                                          "finish_reason": None}])}
        if include_usage:
            yield {"data": _chunk(meta, [], _usage(prompt_tokens, completion_tokens))}
        yield {"data": "[DONE]"}
    finally:
        await choices.aclose()  # also when the client went away (a cancellation)
