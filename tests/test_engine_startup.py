"""An engine that cannot start at all: glm-serve exits non-zero at once (no restarts, no waiting out the start-up
timeout), and its last line quotes the engine's own error and says what to change. Real processes: `python -m
server` starting a real vLLM or llama-server that fails on its own (a model it cannot read, a KV cache that does not
fit in memory, a context the model does not have). Dying after it was ready is a restart instead
(tests/test_engine_faults.py).
"""

from __future__ import annotations

import shutil
import time

import pytest

from server.config import EMBEDDED_CHAT, Settings, resolve_model_path
from server.model_files import model_folder
from tests.conftest import DEFAULT_ENV, engine_env
from tests.support import ServerProcess

PREFIX = "glm-serve: could not load the model: "


def failed_start(env: dict[str, str], name: str, timeout: float) -> tuple[str, float, str]:
    """(the last line glm-serve printed, seconds to exit, its whole log); the exit status must be 1."""
    started = time.monotonic()
    server = ServerProcess({**DEFAULT_ENV, "EMBEDDING_PATH": "none", "WEB_UI": "false", **env}, name=name)
    try:
        code = server.proc.wait(timeout)
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert code == 1, f"exit status {code}\n{server.log_tail(60)}"
    return log.strip().splitlines()[-1], time.monotonic() - started, log


@pytest.fixture(scope="module")
def smol_folder() -> str:
    """The embedded SmolLM2 as the Hugging Face folder every engine loads (converted once into the cache)."""
    return model_folder(resolve_model_path(EMBEDDED_CHAT), Settings().cache_dir)


@pytest.fixture(scope="module")
def broken_weights(smol_folder, tmp_path_factory) -> str:
    """The same folder with its weights cut short: the tokenizer and config load, vLLM's weight loader fails."""
    folder = tmp_path_factory.mktemp("broken") / "SmolLM2-broken"
    shutil.copytree(smol_folder, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return str(folder)


# (case, settings, what the engine says, a word of what to change)
VLLM_CASES = {
    "kv-cache-beyond-memory": ({"VLLM_CPU_KVCACHE_SPACE": "1000"}, "ValueError: Available memory",
                               "VLLM_CPU_KVCACHE_SPACE"),
    "context-beyond-the-model": ({"VLLM_ARGS": "--enforce-eager --max-model-len 10000000"},
                                 "User-specified max_model_len (10000000)", "MAX_MODEL_LEN"),
    "weights-cut-short": ({}, "SafetensorError: Error while deserializing header", "check MODEL_PATH"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", VLLM_CASES)
def test_vllm_that_cannot_start_fails_start_up_with_its_own_reason(case, broken_weights):
    settings, said, change = VLLM_CASES[case]
    if case == "weights-cut-short":
        settings = {"MODEL_PATH": broken_weights}
    last, seconds, log = failed_start(engine_env("vllm", **settings), f"vllm-nostart-{case}", timeout=400)
    print(f"{case}: exit 1 after {seconds:.0f} s: {last}")
    assert last.startswith(PREFIX + "vLLM exited (exit code 1) during start-up: "), last
    assert said in last and change in last, last
    assert log.count("Starting vLLM") == 1 and "restarting it" not in log  # failed start-up, not an outage
    assert seconds < 300


LLAMACPP_CASES = {
    "gguf-cut-short": ("error loading model: tensor", "check the GGUF"),
    "kv-cache-beyond-memory": ("insufficient memory", "MAX_MODEL_LEN"),
}


@pytest.mark.parametrize("case", LLAMACPP_CASES)
def test_llamacpp_that_cannot_start_fails_start_up_with_its_own_reason(case, smol_folder, tmp_path):
    said, change = LLAMACPP_CASES[case]
    gguf = resolve_model_path(EMBEDDED_CHAT)
    settings = {"MODEL_PATH": smol_folder, "LLAMACPP_GGUF": gguf}
    if case == "gguf-cut-short":  # its header and vocabulary are whole (glm-serve reads them), its tensors are not
        data = open(gguf, "rb").read()
        (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 2 // 5])
        settings["LLAMACPP_GGUF"] = str(tmp_path / "cut.gguf")
    else:  # a KV cache of ~2 TB: the allocation itself fails (nothing is touched, nothing is OOM-killed)
        settings["LLAMACPP_ARGS"] = "--ctx-size 100000000"
    last, seconds, log = failed_start(engine_env("llamacpp", **settings), f"llamacpp-nostart-{case}", timeout=300)
    print(f"{case}: exit 1 after {seconds:.0f} s: {last}")
    assert last.startswith(PREFIX + "llama.cpp exited (exit code 1) during start-up: "), last
    assert said in last and change in last, last
    assert log.count("Starting llama.cpp") == 1 and "restarting it" not in log
    assert seconds < 180
