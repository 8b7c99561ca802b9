"""QUANTIZATION=8bit|4bit: real servers answer on bitsandbytes-quantized tiny models, ChatGLM3 included (CPU)."""

from __future__ import annotations

import importlib.util
import signal

import httpx
import pytest
import torch

from server.backends.native.device import ConfigError, pick_dtype, place, quantization_config
from tests.support import CHATGLM3_FIXTURES, ServerProcess
from tests.tiny_models import tiny_chatglm3, tiny_llama


@pytest.fixture(scope="module")
def servers():
    """Real `python -m server` processes, started together (their imports overlap): 8-bit on the chat-template
    road, 4-bit on the ChatGLM3 road (tests/test_plan.py loads every other combination in-process)."""
    env = {"EMBEDDING_PATH": "none", "WEB_UI": "false", "MAX_RUNNING_REQUESTS": "4"}
    specs = {"llama-8bit": (tiny_llama(), "8bit"), "chatglm3-4bit": (tiny_chatglm3(), "4bit")}
    procs = {name: ServerProcess({**env, "MODEL_PATH": str(path), "QUANTIZATION": mode}, name=f"quant-{name}")
             for name, (path, mode) in specs.items()}
    try:
        yield {name: proc.wait_ready(300) for name, proc in procs.items()}
    finally:
        for proc in procs.values():  # all at once: each takes a few seconds to drain
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.stop()


@pytest.mark.parametrize("name", ["llama-8bit", "chatglm3-4bit"])
def test_quantized_server_answers(servers, name):
    srv = servers[name]
    model = httpx.get(srv.base_url + "/models", timeout=30).json()["data"][0]["id"]
    r = httpx.post(srv.base_url + "/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "Hello, who are you?"}],
        "max_tokens": 8, "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] >= 1
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    log = srv.log_path.read_text()
    mode = name.rsplit("-", 1)[1]
    assert f"quantization {mode}" in log  # startup summary
    assert "plan estimated" in log  # the planner's estimate next to the measured weights
    assert log.count("MatMul8bitLt") == 0  # LLM.int8's per-layer cast warning is said once, by us


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_chatglm3_native_loader_quantizes(mode):
    if not CHATGLM3_FIXTURES.exists():
        pytest.fail("no ChatGLM3 fixtures beside the repo (../shared)")
    import bitsandbytes as bnb

    from server.backends.native.loader import load_chat_model

    reference = load_chat_model(str(tiny_chatglm3()), place("cpu", "float32"), cache_dir="/nonexistent")
    loaded = load_chat_model(str(tiny_chatglm3()), place("cpu", "bfloat16", mode), cache_dir="/nonexistent")
    layer = loaded.model.model.layers[0]
    expected = bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit
    for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(module, expected)
    assert type(loaded.model.lm_head) is torch.nn.Linear  # transformers keeps the output layer unquantized
    assert loaded.family.name == "chatglm3"
    assert loaded.weight_bytes < reference.weight_bytes / 2
    ids = torch.tensor([[64790, 64792, 64795, 30910, 13, 36474, 64796]])
    with torch.no_grad():
        got = loaded.model(input_ids=ids).logits[0, -1].float()
        want = reference.model(input_ids=ids).logits[0, -1]
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.9  # quantized, yet the same model


def test_impossible_combinations_are_clear_errors(monkeypatch):
    with pytest.raises(ConfigError, match="no MPS backend"):
        quantization_config("4bit", "mps", torch.float16)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else find_spec(n, *a))
    with pytest.raises(ConfigError, match="pip install"):
        quantization_config("8bit", "cpu", torch.bfloat16)


def test_compute_dtypes():
    qc = quantization_config("4bit", "cpu", torch.bfloat16, double_quant=False)
    assert qc.bnb_4bit_quant_type == "nf4" and qc.bnb_4bit_compute_dtype == torch.bfloat16
    assert qc.bnb_4bit_use_double_quant is False
    assert quantization_config("4bit", "cpu", torch.bfloat16).bnb_4bit_use_double_quant is True
    assert pick_dtype("auto", "cuda", "8bit") == torch.float16  # LLM.int8 multiplies in fp16
    assert pick_dtype("auto", "cpu", "4bit") == torch.bfloat16
    assert place("cpu", "float32", "4bit").quantization_config.bnb_4bit_compute_dtype == torch.float32
