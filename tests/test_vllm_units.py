"""The vLLM backend's pure parts, no vLLM process: wire format, forced-prefix rule, command line, LoRA translation.

The real-vLLM tests are tests/test_vllm_backend.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from server.backends.base import TokenChunk
from server.backends.child.prefix import allowed_next
from server.backends.native.scheduler import Sequence
from server.backends.vllm.adapters import max_lora_rank, prepare_adapters, translate_glm_adapter
from server.backends.vllm.launch import VLLMInstall, vllm_argv
from server.backends.vllm.wire import UpstreamError, generate_body, parse_event, sampling_params
from server.config import Settings
from server.errors import ConfigError
from server.types import SamplingParams

# The vLLM-shaped ChatGLM3 of ../shared/fixtures/chatglm3/make_vllm_shape.py: 2 heads of 64, 1 kv group.
GLM_BASE = {"model_type": "chatglm", "hidden_size": 128, "num_attention_heads": 2, "kv_channels": 64,
            "multi_query_attention": True, "multi_query_group_num": 1, "ffn_hidden_size": 256, "num_layers": 2}
INSTALL = VLLMInstall(python="/venv/bin/python", version="0.32.0", has_bitsandbytes=False)


# ---- wire ---------------------------------------------------------------------------------------------------


def test_sampling_params_send_only_our_stop_ids_and_greedy_as_temperature_zero():
    params = sampling_params(SamplingParams(temperature=0, top_k=0, seed=None), max_tokens=7, stop_token_ids={9, 2})
    assert params["temperature"] == 0 and params["top_k"] == 0 and params["max_tokens"] == 7
    assert params["ignore_eos"] is True and params["stop_token_ids"] == [2, 9]
    assert "seed" not in params and "allowed_token_ids" not in params and "stop" not in params
    sampled = sampling_params(SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=3, presence_penalty=0.5,
                                             frequency_penalty=-0.5, repetition_penalty=1.1),
                              max_tokens=1, stop_token_ids=set(), allowed_token_ids=[5, 6])
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["seed"]) == (0.7, 0.9, 40, 3)
    assert (sampled["presence_penalty"], sampled["frequency_penalty"], sampled["repetition_penalty"]) == \
        (0.5, -0.5, 1.1)
    assert sampled["allowed_token_ids"] == [5, 6]


def test_generate_body_names_the_adapter_only_when_there_is_one():
    base = json.loads(generate_body("r1", [1, 2], {"max_tokens": 1}, model=None, stream=True))
    assert base == {"request_id": "r1", "token_ids": [1, 2], "sampling_params": {"max_tokens": 1}, "stream": True}
    assert json.loads(generate_body("r1", [1], {}, model="law", stream=False))["model"] == "law"


def test_parse_event_maps_vllm_stream_lines():
    line = 'data: {"request_id":"generate-tokens-x","choices":[{"index":0,"finish_reason":null,"token_ids":[5]}]}'
    assert parse_event(line) == TokenChunk([5], None)
    for theirs, ours in (("stop", "stop"), ("length", "length"), ("abort", "abort")):
        line = f'data: {{"choices":[{{"finish_reason":"{theirs}","stop_reason":null,"token_ids":[]}}]}}'
        assert parse_event(line) == TokenChunk([], ours)
    assert parse_event("data: [DONE]") is None and parse_event("") is None and parse_event(": ping") is None
    assert parse_event('data: {"choices":[],"usage":{"prompt_tokens":1}}') is None
    with pytest.raises(UpstreamError, match="Internal server error"):
        parse_event('data: {"error":{"message":"Internal server error","type":"InternalServerError","code":500}}')
    with pytest.raises(UpstreamError, match="error"):
        parse_event('data: {"choices":[{"finish_reason":"error","token_ids":[]}]}')


# ---- forced prefixes: one rule on both engines -----------------------------------------------------------------


@pytest.mark.parametrize("done", [[], [5], [5, 6], [5, 6, 7], [10], [5, 8], [4]])
def test_allowed_next_is_the_native_schedulers_rule(done):
    prefixes = [[5, 6, 7], [5, 8, 9], [10], [5, 6]]
    native = Sequence(prompt_ids=[1], params=SamplingParams(), max_tokens=9, stop_token_ids=set(), sink=print,
                      forced_prefixes=[list(p) for p in prefixes], generated=list(done))
    assert allowed_next(prefixes, done) == native.allowed_next()


# ---- the vLLM command line -----------------------------------------------------------------------------------


def test_vllm_argv_translates_settings_and_appends_vllm_args_last(tmp_path):
    from server.backends.vllm.adapters import VLLMAdapter

    settings = Settings(vllm_python="/venv/bin/python", dtype="bfloat16", max_model_len=4096,
                        tensor_parallel_size=2, pipeline_parallel_size=2, gpu_memory_utilization=0.8,
                        max_running_requests=32, vllm_args="--enforce-eager --max-model-len 1024 --seed '7'")
    adapters = [VLLMAdapter("law", "/a/law", 4), VLLMAdapter("med", "/a/med dir", 12)]
    argv = vllm_argv(settings, INSTALL, model_folder="/m", served_name="chatglm3-6b", port=8123, adapters=adapters,
                     tokenizer="/t")
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    flags = " ".join(argv)
    assert "--tokens-only" not in flags  # vLLM's structured outputs need its tokenizer
    for part in ("--model /m", "--served-model-name chatglm3-6b", "--host 127.0.0.1", "--port 8123",
                 "--enable-scale-out", "--tokenizer /t", "--dtype bfloat16", "--tensor-parallel-size 2",
                 "--pipeline-parallel-size 2",
                 "--gpu-memory-utilization 0.8", "--max-num-seqs 32", "--max-model-len 4096", "--enable-lora",
                 "--max-lora-rank 16", "--max-loras 2"):
        assert part in flags, part
    i = argv.index("--lora-modules")
    assert [json.loads(a) for a in argv[i + 1 : i + 3]] == [{"name": "law", "path": "/a/law"},
                                                           {"name": "med", "path": "/a/med dir"}]
    assert argv[-5:] == ["--enforce-eager", "--max-model-len", "1024", "--seed", "7"]  # argparse: last one wins


def test_quantization_on_vllm_is_bitsandbytes_4bit_or_a_clear_error():
    args = dict(model_folder="/m", served_name="m", port=1, adapters=[])
    with pytest.raises(ConfigError, match="no in-flight 8-bit"):
        vllm_argv(Settings(quantization="8bit"), INSTALL, **args)
    with pytest.raises(ConfigError, match=r"this vLLM \(0.32.0\) has no bitsandbytes"):
        vllm_argv(Settings(quantization="4bit"), INSTALL, **args)
    with_bnb = VLLMInstall(python="p", version="0.10.0", has_bitsandbytes=True)
    argv = vllm_argv(Settings(quantization="4bit"), with_bnb, **args)
    assert argv[argv.index("--quantization") + 1] == "bitsandbytes"


def test_max_lora_rank_is_a_rank_vllm_accepts():
    from server.backends.vllm.adapters import VLLMAdapter

    assert max_lora_rank([VLLMAdapter("a", "p", 4)]) == 8
    assert max_lora_rank([VLLMAdapter("a", "p", 1)]) == 1
    assert max_lora_rank([VLLMAdapter("a", "p", 12), VLLMAdapter("b", "p", 64)]) == 64
    with pytest.raises(ConfigError, match="up to 512"):
        max_lora_rank([VLLMAdapter("a", "p", 600)])


# ---- LoRA adapters in GLM names -> ChatGLM3 names, exactly ------------------------------------------------------


def _glm_adapter(modules: dict[str, tuple[int, int]], ranks: dict[str, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(GLM_BASE["num_layers"]):
        for module, (rows, cols) in modules.items():
            r = ranks.get(module.rpartition(".")[2], 4)
            name = f"base_model.model.model.layers.{layer}.{module}"
            weights[f"{name}.lora_A.weight"] = torch.randn(r, cols, generator=gen)
            weights[f"{name}.lora_B.weight"] = torch.randn(rows, r, generator=gen)
    return weights


GLM_MODULES = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (64, 128), "self_attn.v_proj": (64, 128),
               "self_attn.o_proj": (128, 128), "mlp.gate_up_proj": (512, 128), "mlp.down_proj": (128, 256)}


def _delta(weights, module: str, scale: float) -> torch.Tensor:
    return scale * weights[f"{module}.lora_B.weight"] @ weights[f"{module}.lora_A.weight"]


@pytest.mark.parametrize("rslora", [False, True])
def test_glm_adapter_fuses_into_query_key_value_exactly(rslora):
    weights = _glm_adapter(GLM_MODULES, ranks={"v_proj": 8})
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": rslora, "rank_pattern": {"v_proj": 8},
              "alpha_pattern": {"v_proj": 4}, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_up_proj", "down_proj"]}
    tensors, new = translate_glm_adapter(weights, config, GLM_BASE)

    def scale(alpha, r):
        return alpha / math.sqrt(r) if rslora else alpha / r

    assert new["r"] == new["lora_alpha"] == 4 + 4 + 8 and not new["use_rslora"] and not new["rank_pattern"]
    assert new["target_modules"] == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    for layer in range(GLM_BASE["num_layers"]):
        glm, ours = f"base_model.model.model.layers.{layer}", f"base_model.model.transformer.encoder.layers.{layer}"
        fused = _delta(tensors, f"{ours}.self_attention.query_key_value", 1.0)
        expected = torch.cat([_delta(weights, f"{glm}.self_attn.q_proj", scale(16, 4)),
                              _delta(weights, f"{glm}.self_attn.k_proj", scale(16, 4)),
                              _delta(weights, f"{glm}.self_attn.v_proj", scale(4, 8))])
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
        for glm_name, chatglm_name in (("self_attn.o_proj", "self_attention.dense"),
                                       ("mlp.gate_up_proj", "mlp.dense_h_to_4h"),
                                       ("mlp.down_proj", "mlp.dense_4h_to_h")):
            torch.testing.assert_close(_delta(tensors, f"{ours}.{chatglm_name}", 1.0),
                                       _delta(weights, f"{glm}.{glm_name}", scale(16, 4)), rtol=1e-5, atol=1e-5)
    assert all(t.shape[0] == 16 or t.shape[1] == 16 for t in tensors.values())  # one rank, zero padded


def test_glm_adapter_on_q_and_v_only_leaves_k_rows_untouched():
    weights = _glm_adapter({k: v for k, v in GLM_MODULES.items() if k in ("self_attn.q_proj", "self_attn.v_proj")},
                           ranks={})
    tensors, new = translate_glm_adapter(weights, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                                         GLM_BASE)
    assert new["r"] == 8 and new["target_modules"] == ["query_key_value"]
    fused = _delta(tensors, "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value", 1.0)
    glm = "base_model.model.model.layers.0.self_attn"
    torch.testing.assert_close(fused[:128], _delta(weights, f"{glm}.q_proj", 2.0))
    assert torch.count_nonzero(fused[128:192]) == 0  # k
    torch.testing.assert_close(fused[192:], _delta(weights, f"{glm}.v_proj", 2.0))


def test_glm_adapter_refusals_are_clear():
    weights = _glm_adapter({"self_attn.q_proj": (128, 128)}, ranks={})
    with pytest.raises(ConfigError, match="DoRA"):
        translate_glm_adapter(weights, {"use_dora": True}, GLM_BASE)
    with pytest.raises(ConfigError, match="modules_to_save"):
        translate_glm_adapter(weights, {"modules_to_save": ["lm_head"]}, GLM_BASE)
    wrong = _glm_adapter({"self_attn.q_proj": (96, 128)}, ranks={})
    with pytest.raises(ConfigError, match="another model size"):
        translate_glm_adapter(wrong, {}, GLM_BASE)
    embed = {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 10)}
    with pytest.raises(ConfigError, match="embedding LoRA"):
        translate_glm_adapter(embed, {}, GLM_BASE)


def test_prepare_adapters_translates_once_into_the_cache_and_passes_chatglm_names_through(tmp_path):
    from safetensors.torch import save_file

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(GLM_BASE))
    glm = tmp_path / "glm-lora"
    glm.mkdir()
    save_file(_glm_adapter(GLM_MODULES, ranks={}), str(glm / "adapter_model.safetensors"))
    (glm / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                         "target_modules": ["q_proj", "k_proj", "v_proj"]}))
    orig = tmp_path / "chatglm-lora"
    orig.mkdir()
    (orig / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["query_key_value", "dense"]}))
    cache = tmp_path / "cache"
    first = prepare_adapters({"g": str(glm), "o": str(orig)}, model_folder=str(base), cache_dir=str(cache))
    assert [(a.name, a.translated, a.rank) for a in first] == [("g", True, 12), ("o", False, 4)]
    assert first[0].path.startswith(str(cache / "vllm-lora")) and first[1].path == str(orig)
    again = prepare_adapters({"g": str(glm)}, model_folder=str(base), cache_dir=str(cache))
    assert again[0].path == first[0].path
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        prepare_adapters({"x": str(tmp_path)}, model_folder=str(base), cache_dir=str(cache))


def test_export_lora_cli_writes_the_chatglm3_named_copy(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from server.backends.vllm.export_lora import main

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(GLM_BASE))
    adapter = tmp_path / "glm-lora"
    adapter.mkdir()
    save_file(_glm_adapter(GLM_MODULES, ranks={}), str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    main([str(base), str(adapter), str(tmp_path / "out")])
    assert "rank 12" in capsys.readouterr().out
    names = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.encoder.layers.1.self_attention.query_key_value.lora_B.weight" in names
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_alpha"] == 12
