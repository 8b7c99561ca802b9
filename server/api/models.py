"""/v1/models, /health and /metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server.api.errors import APIError

router = APIRouter()
_CREATED = int(time.time())


def _cards(request: Request) -> list[dict]:
    state = request.app.state
    cards = []
    engine = getattr(state, "engine", None)
    if engine is not None:
        for c in engine.models():
            cards.append({"id": c.id, "object": "model", "created": _CREATED, "owned_by": c.owned_by,
                          "root": c.root or c.id, "parent": c.root, "max_model_len": c.context_length,
                          "kind": c.kind})
    emb = getattr(state, "embedder", None)
    if emb is not None:
        for name in state.embedding_names:
            cards.append({"id": name, "object": "model", "created": _CREATED, "owned_by": "glm-serve",
                          "root": emb.model_id, "parent": None, "max_model_len": emb.max_seq_length,
                          "kind": "embedding"})
    return cards


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": _cards(request)}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    for card in _cards(request):
        if card["id"] == model_id:
            return card
    raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")


@router.get("/health")
async def health(request: Request):
    state = request.app.state
    status = getattr(state, "status", "ready")
    engine = getattr(state, "engine", None)
    down = engine.backend.health() if status == "ready" and engine is not None else None
    if down:
        error = APIError(503, f"The engine is not serving: {down}", code="engine_unavailable")
        return JSONResponse({"status": "unavailable", **error.body()}, status_code=503, headers={"Retry-After": "5"})
    if status == "ready":
        return {"status": status}
    # /health is open even when API keys are set, so the load failure's reason (paths, hub ids) stays in the log.
    message = ("The model failed to load; the server log says why." if status == "failed"
               else "The model is still loading. Retry in a few seconds.")
    error = APIError(503, message, code="model_load_failed" if status == "failed" else "model_loading")
    return JSONResponse({"status": status, **error.body()}, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics")
async def metrics(request: Request):
    registry = getattr(request.app.state, "metrics", None)
    if registry is None:
        raise APIError(404, "Metrics are not enabled.")
    engine = getattr(request.app.state, "engine", None)
    data, content_type = registry.render(engine.backend.capacity() if engine is not None else None)
    return Response(data, media_type=content_type)
