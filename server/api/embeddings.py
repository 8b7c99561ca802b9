"""/v1/embeddings: strings in, unit-norm vectors out (float lists or base64 float32)."""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request

from server.api.deps import embedder, until_disconnected
from server.api.errors import APIError
from server.api.protocol import EmbeddingRequest

router = APIRouter()

MAX_INPUTS = 2048  # the OpenAI limit per request


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request):
    emb = embedder(request)
    if body.model and body.model not in emb_names(request):
        raise APIError(404, f"The model '{body.model}' does not exist. GET /v1/models lists the served models.",
                       param="model", code="model_not_found")
    texts = _texts(body)
    if body.dimensions is not None and body.dimensions != emb.dimensions:
        raise APIError(400, f"This embedding model produces {emb.dimensions}-dimensional vectors and cannot "
                       f"shorten them; omit `dimensions` or set it to {emb.dimensions}.", param="dimensions")
    vectors, tokens = await until_disconnected(request, emb.embed(texts))
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": body.model or emb.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def emb_names(request: Request) -> set[str]:
    return set(getattr(request.app.state, "embedding_names", ()))


def _texts(body: EmbeddingRequest) -> list[str]:
    raw = body.input
    if isinstance(raw, str):
        return [raw]
    if not raw:
        raise APIError(400, "`input` must not be empty.", param="input")
    if not all(isinstance(t, str) for t in raw):
        raise APIError(400, "Token-id input is not supported: send strings. (LangChain: "
                       "OpenAIEmbeddings(..., check_embedding_ctx_length=False))", param="input")
    if len(raw) > MAX_INPUTS:
        raise APIError(400, f"At most {MAX_INPUTS} inputs per request; got {len(raw)}.", param="input")
    return list(raw)


def _encode(vector: np.ndarray, fmt: str | None):
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
