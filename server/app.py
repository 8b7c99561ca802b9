"""create_app(settings): routers, middleware, error handlers, and a lifespan that loads the models.

Models load in the background after the port is open, so /health answers 503 while loading
instead of the connection being refused.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.api import chat, completions, embeddings, models, responses
from server.api.auth import AuthMiddleware, KeyRing
from server.api.errors import install_error_handlers
from server.api.limits import BodyLimitMiddleware
from server.api.middleware import RequestContextMiddleware
from server.api.owner import Owners
from server.config import Settings
from server.metrics import Metrics
from server.serving.responses_store import ResponseStore

log = logging.getLogger("glm_serve")


def create_app(settings: Settings, *, engine=None, embedder=None, on_load_failure=None) -> FastAPI:
    """With `engine`/`embedder` given (tests, benchmarks) nothing is loaded; otherwise the settings say what."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.status = "loading"
        loader = None
        if engine is None:
            loader = asyncio.create_task(_load(app, settings, metrics, on_load_failure))
        else:
            await _attach(app, settings, engine, embedder)
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                loader.cancel()
            for part in (getattr(app.state, "engine", None), getattr(app.state, "embedder", None)):
                if part is not None:
                    await part.stop()
            app.state.responses_store.close()

    app = FastAPI(title="glm-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI- and ZhipuAI-compatible chat completions and embeddings.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = None
    app.state.embedder = None
    app.state.embedding_names = []
    app.state.embeddings_disabled = settings.embedding_path.lower() == "none"
    app.state.responses_store = ResponseStore.from_settings(settings)  # the file opens on first use
    app.state.responses_owners = Owners(settings.api_key_list)
    install_error_handlers(app)
    for router in (chat.router, completions.router, embeddings.router, models.router, responses.router):
        app.include_router(router)
    _install_middleware(app, settings, metrics)
    if settings.web_ui:
        _mount_web_ui(app)
    return app


def _install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    # Starlette runs the last added middleware first: CORS -> request id/log -> auth -> body limit -> routes,
    # so rejections still carry CORS headers and a request id, and nobody unauthenticated gets a body read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, timeout=settings.body_read_timeout)
    app.add_middleware(AuthMiddleware, keys=KeyRing(settings.api_key_list))

    app.add_middleware(RequestContextMiddleware, metrics=metrics, send_timeout=settings.stream_send_timeout)

    origins = settings.cors_origin_list
    if origins:
        # Browsers refuse credentials with "*", and a wildcard with credentials would let any site use the keys.
        # (Starlette echoes the caller's origin when "*" is in the list and credentials are on: never allow that.)
        wildcard = "*" in origins
        if wildcard:
            origins = ["*"]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=not wildcard,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Retry-After"])


_PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                "base-uri 'none'; form-action 'none'")


def _mount_web_ui(app: FastAPI) -> None:
    static = Path(__file__).parent / "static"
    if not (static / "index.html").exists():
        return
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        # The page renders model output: even if some markup slipped past the escaping, no script but our own
        # file runs, nothing loads from elsewhere, and no other site can frame the page (and its API key field).
        return FileResponse(static / "index.html", headers={"Content-Security-Policy": _PAGE_POLICY,
                                                             "X-Content-Type-Options": "nosniff"})


async def _attach(app: FastAPI, settings: Settings, engine, embedder) -> None:
    await engine.start()
    app.state.engine = engine
    if embedder is not None:
        await embedder.start()
        app.state.embedder = embedder
        app.state.embedding_names = [embedder.model_id]
    app.state.status = "ready"


async def _load(app: FastAPI, settings: Settings, metrics: Metrics, on_load_failure) -> None:
    from server.bootstrap import build_chat, build_embedder, embedding_device, startup_summary

    try:
        chat = await asyncio.to_thread(build_chat, settings, metrics)
        embedder = None
        if not app.state.embeddings_disabled:
            embedder = await asyncio.to_thread(build_embedder, settings, embedding_device(settings, chat), metrics)
        await _attach(app, settings, chat, embedder)
        log.info("%s", startup_summary(settings, chat, embedder))
    except Exception as exc:
        reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        app.state.status = "failed"
        app.state.load_error = reason
        log.error("Could not load the model: %s", reason)
        log.debug("load failure", exc_info=True)
        if on_load_failure is not None:
            on_load_failure(reason)
