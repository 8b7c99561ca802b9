"""Shared fixtures. The default server is the real one, on the embedded models, started once per session."""

from __future__ import annotations

import pytest

from tests.support import CHATGLM3_FIXTURES, running_server

# float32 keeps greedy outputs bit-stable between a request alone and the same request in a batch;
# the user default on CPU is bfloat16 (tested separately).
DEFAULT_ENV = {"DTYPE": "float32", "MODEL_ALIASES": "gpt-3.5-turbo", "LOG_LEVEL": "info"}


@pytest.fixture(scope="session")
def server():
    with running_server(DEFAULT_ENV, name="embedded") as srv:
        yield srv


@pytest.fixture(scope="session")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def chatglm3_fixtures():
    if not CHATGLM3_FIXTURES.exists():
        pytest.skip("../shared/fixtures/chatglm3 is not beside the repo")
    return CHATGLM3_FIXTURES
