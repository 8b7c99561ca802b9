"""What the routers need from the app: the engines (or a 503 while they load), disconnect handling, and freeing
the engine's slots when a request ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

import anyio
from fastapi import Request

from server.api.errors import APIError
from server.errors import EngineError

T = TypeVar("T")


def chat_engine(request: Request):
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise APIError(503, "The chat model is still loading. Retry in a few seconds (GET /health says when).",
                       code="model_loading", headers={"Retry-After": "5"})
    return engine


def adapter_for(engine, model: str | None) -> str:
    """The LoRA adapter (or "" for the base model) a requested model id names; 404 if it names nothing served."""
    adapter = engine.resolve(model)
    if adapter is None:
        raise APIError(404, f"The model '{model}' does not exist. GET /v1/models lists the served models.",
                       param="model", code="model_not_found")
    return adapter


def embedder(request: Request):
    emb = getattr(request.app.state, "embedder", None)
    if emb is None:
        if getattr(request.app.state, "embeddings_disabled", False):
            raise APIError(404, "This server has no embedding model (EMBEDDING_PATH=none).", code="model_not_found")
        raise APIError(503, "The embedding model is still loading. Retry in a few seconds.",
                       code="model_loading", headers={"Retry-After": "5"})
    return emb


async def queue_all(engine, prepared: Iterable) -> list:
    """The engine streams of a request's prepared choices, all queued now, so that overload is a 429 before anything
    streams; when one is refused, those already queued are freed before the error goes out."""
    streams = []
    try:
        for p in prepared:
            streams.append(engine.chat(p))
    except EngineError:
        for s in streams:
            await s.aclose()
        raise
    return streams


class Merged:
    """The events of a request's n choices as they come, each with its choice's index. A choice whose engine stream
    fails arrives as an EngineError event, in band, so the other choices and the connection stay alive until the
    caller reports it. Closing frees every choice's engine slot."""

    def __init__(self, streams: list):
        self._streams = streams
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]

    async def _pump(self, index: int, stream) -> None:
        try:
            async for event in stream:
                await self._queue.put((index, event))
        except EngineError as exc:
            await self._queue.put((index, exc))
        except Exception as exc:  # noqa: BLE001 - reported in band, never lost
            await self._queue.put((index, EngineError(f"Generation failed: {exc}")))

    async def get(self) -> tuple[int, object]:
        return await self._queue.get()

    async def aclose(self) -> None:
        await release(self._streams, self._tasks)


async def until_disconnected(request: Request, work: Awaitable[T], poll: float = 0.25) -> T:
    """Await `work`, but cancel it if the client goes away (FastAPI would keep generating for nobody)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "Client closed the request.", code="client_closed")
    finally:
        if not task.done():
            task.cancel()
            # Wait until the work has really stopped: its cleanup is what frees the engine's slots.
            await asyncio.gather(task, return_exceptions=True)


async def release(streams: Iterable, tasks: Iterable[asyncio.Task] = ()) -> None:
    """Free the engine slots of `streams` (and stop the `tasks` reading them) when a request ends, however it ends.

    A client that went away arrives as a cancellation, and in a cancelled anyio scope every await is cancelled
    again: the slots are freed synchronously first, then the tidying up runs under a shield.
    """
    streams, tasks = list(streams), list(tasks)
    for s in streams:
        s.cancel()
    for t in tasks:
        t.cancel()
    with anyio.move_on_after(5, shield=True):
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()
