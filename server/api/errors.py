"""One exception type -> the OpenAI error JSON, for every 4xx/5xx the server sends."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import (
    EngineError,
    EngineFailure,
    EngineOverloaded,
    EngineUnavailable,
    RequestTimeout,
)

log = logging.getLogger("glm_serve.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


# The one home of an engine error's HTTP status; the first matching class along the MRO wins, EngineError is 400.
_ENGINE_STATUS: dict[type, int] = {
    EngineOverloaded: 429,
    EngineUnavailable: 503,
    RequestTimeout: 504,
    EngineFailure: 500,
    EngineError: 400,
}


def engine_status(exc: EngineError) -> int:
    return next(_ENGINE_STATUS[k] for k in type(exc).__mro__ if k in _ENGINE_STATUS)


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        default = "server_error" if status_code >= 500 else "invalid_request_error"
        self.type = error_type or _TYPES.get(status_code, default)
        self.headers = headers

    @classmethod
    def from_engine(cls, exc: EngineError) -> APIError:
        headers = None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            headers = {"Retry-After": str(max(1, round(retry_after)))}
        return cls(engine_status(exc), exc.message, param=exc.param, code=exc.code, headers=headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}.", None
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = f"'{param}': " if param else ""
    return f"Invalid request: {where}{msg}{more}.", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError):
        return APIError.from_engine(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return APIError(400, message, param=param, code="invalid_value" if param else "invalid_json").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            message = "Not found. The API lives under /v1 (e.g. /v1/chat/completions, /v1/embeddings, /v1/models)."
        return APIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "Internal server error. The server log has the details.").response()
