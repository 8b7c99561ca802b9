"""/v1/embeddings: strings in, unit-norm vectors out (float lists or base64 float32)."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

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
    lengths = await asyncio.to_thread(emb.token_lengths, texts)  # seconds for a 4 MiB body: not on the event loop
    _check_lengths(lengths, request.app.state.settings.embedding_max_input_tokens)
    vectors, tokens = await until_disconnected(request, emb.embed(texts, lengths))
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)]
    answer = {"object": "list", "data": data, "model": body.model or emb.model_id,
              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    # orjson writes the float32 rows as they are (shortest float32 digits, ~2 ms for 64 x 384); FastAPI's
    # jsonable_encoder + json.dumps took ~45 ms for the same batch and wrote float64 digits of float32 values.
    return Response(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


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


def _check_lengths(lengths: list[int], limit: int) -> None:
    """Like OpenAI, refuse over-long inputs instead of embedding a silently truncated prefix of them.

    Inputs under the limit but over the model's own window (512 tokens for most sentence-transformers) are
    still truncated by the model: EMBEDDING_MAX_INPUT_TOKENS bounds the work, not the window.
    """
    for i, n in enumerate(lengths):
        if n > limit:
            raise APIError(400, f"input[{i}] is {n} tokens long; this server accepts at most {limit} per input "
                           "(EMBEDDING_MAX_INPUT_TOKENS).", param="input", code="context_length_exceeded")


def _encode(vector: np.ndarray, fmt: str | None):
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return np.ascontiguousarray(vector, dtype=np.float32)
