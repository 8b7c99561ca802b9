"""Shared fixtures. The default server is the real one, on the embedded models, started once per session."""

from __future__ import annotations

import os

import pytest

from tests.support import CHATGLM3_FIXTURES, REPO, running_server

# float32 keeps greedy outputs bit-stable between a request alone and the same request in a batch;
# the user default on CPU is bfloat16 (tested separately).
DEFAULT_ENV = {"DTYPE": "float32", "MODEL_ALIASES": "gpt-3.5-turbo", "LOG_LEVEL": "info"}


@pytest.fixture(scope="session")
def server():
    with running_server(DEFAULT_ENV, name="embedded") as srv:
        yield srv


# The end-to-end suite runs on both engines: glm-serve's native scheduler, and a real vLLM (CPU build, its own venv
# from .ci/vllm_venv.sh) that glm-serve starts and supervises. A missing vLLM fails these tests, it never skips them.
ENGINES = ["native", "vllm"]
VLLM_PYTHON = os.environ.get("GLM_SERVE_TEST_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
# --enforce-eager skips ~2.5 min of torch.compile warm-up; 1 GiB of KV cache and no reserved core on 2 cores.
VLLM_ENV = {"ENGINE": "vllm", "VLLM_PYTHON": VLLM_PYTHON, "VLLM_ARGS": "--enforce-eager",
            "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def vllm_env(**extra: str) -> dict[str, str]:
    if not os.path.exists(VLLM_PYTHON):
        pytest.fail(f"No vLLM at {VLLM_PYTHON}: run .ci/vllm_venv.sh (or set GLM_SERVE_TEST_VLLM_PYTHON).")
    return {**VLLM_ENV, **extra}


@pytest.fixture(scope="session")
def vllm_server():
    with running_server({**DEFAULT_ENV, **vllm_env()}, name="embedded-vllm", timeout=900) as srv:
        yield srv


@pytest.fixture(scope="session", params=ENGINES)
def engine_server(request):
    """The embedded-model server on each engine in turn (same settings, same assertions)."""
    return request.getfixturevalue("server" if request.param == "native" else "vllm_server")


@pytest.fixture(scope="session")
def engine_client(engine_server):
    import openai

    return openai.OpenAI(base_url=engine_server.base_url, api_key="sk-test", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def chatglm3_fixtures():
    if not CHATGLM3_FIXTURES.exists():
        pytest.fail("../shared/fixtures/chatglm3 is not beside the repo")
    return CHATGLM3_FIXTURES
