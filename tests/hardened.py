"""Shared by the hardening tests: the settings of a server with every switch on, and an in-process app.

The real server itself is the `hardened_server` fixture in tests/hardened_server.py.
"""

from __future__ import annotations

from server.app import create_app
from server.backends.base import Capacity
from server.config import Settings
from server.types import ModelCard

KEY = "sk-glm-serve-test-0123456789abcdef"
ZHIPU_ID, ZHIPU_SECRET = "glmtest", "zhipu-secret-0123456789"
ZHIPU_KEY = f"{ZHIPU_ID}.{ZHIPU_SECRET}"
ORIGIN = "https://app.example"
HARDENED_ENV = {
    "DTYPE": "float32",
    "API_KEYS": f"{KEY},{ZHIPU_KEY}",
    "CORS_ORIGINS": ORIGIN,
    "MAX_REQUEST_BYTES": "65536",
    "EMBEDDING_MAX_INPUT_TOKENS": "256",
    "MAX_MODEL_LEN": "512",
    "LOG_LEVEL": "info",
}
AUTH = {"Authorization": f"Bearer {KEY}"}


class StubBackend:
    def health(self):
        return None

    def capacity(self):
        return Capacity(running=0, waiting=0, max_running=1, max_waiting=1)


class StubEngine:
    """Just enough of a chat service for /v1/models: the middleware tests need no model."""

    backend = StubBackend()

    async def start(self):
        pass

    async def stop(self):
        pass

    def models(self):
        return [ModelCard("stub", context_length=64)]

    def resolve(self, model):
        return "" if model in (None, "stub") else None


def stub_app(**settings):
    """create_app on the stub engine; `_env_file=None` so a developer's .env cannot change the test."""
    base = {"embedding_path": "none", "web_ui": False, "api_keys": "", "api_keys_file": "", "cors_origins": ""}
    return create_app(Settings(_env_file=None, **{**base, **settings}), engine=StubEngine())
