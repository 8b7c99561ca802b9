"""What can go wrong serving a request, as plain exceptions: no HTTP here.

The API layer maps each class to its HTTP status and OpenAI error type in one table (server/api/errors.py).
"""

from __future__ import annotations


class EngineError(Exception):
    """A request (or a setting) that cannot be served as asked; the message says what to change."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class PromptTooLong(EngineError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int):
        super().__init__(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or the completion.",
            param="messages",
            code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.context = context


class EngineOverloaded(EngineError):
    """Every running and waiting slot is taken: retry shortly."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message, code="server_overloaded")
        self.retry_after = retry_after


class EngineUnavailable(EngineError):
    """The engine is not serving right now (starting, restarting after a crash, or gone)."""

    def __init__(self, message: str, retry_after: float = 5.0, code: str = "engine_unavailable"):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class RequestTimeout(EngineError):
    pass


class EngineFailure(EngineError):
    """Generation itself failed (a numerical error, an engine step that crashed)."""


class ConfigError(EngineError):
    """A setting combination that cannot work on this machine; the message says what to change."""
