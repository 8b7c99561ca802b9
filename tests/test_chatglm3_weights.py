"""ChatGLM3 checkpoints loaded natively as GlmForCausalLM, against goldens from THUDM's original modeling code."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GlmForCausalLM

from server.errors import EngineError
from server.families.chatglm3.weights import chatglm_config_to_glm, is_chatglm_config, load_chatglm3

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared/fixtures/chatglm3"
TOL = 1e-4  # the README measured 0.0 (sdpa) and <= 4.4e-6 (eager) in float32
VARIANTS = ["tiny-chatglm3", "tiny-chatglm3-32k"]


def fixture_json(name):
    return json.loads((FIXTURES / name).read_text())


def writable_copy(src, dst):
    # The fixtures are read-only; copies must not be, or tmp_path cannot clean them up.
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Both variants as complete folders (the 32k one only ships its config.json, as its README says)."""
    k32 = writable_copy(FIXTURES / "tiny-chatglm3", tmp_path_factory.mktemp("ckpt") / "tiny-chatglm3-32k")
    shutil.copyfile(FIXTURES / "tiny-chatglm3-32k/config.json", k32 / "config.json")
    return {"tiny-chatglm3": FIXTURES / "tiny-chatglm3", "tiny-chatglm3-32k": k32}


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: load_chatglm3(path, dtype=torch.float32) for name, path in checkpoints.items()}


def golden_cases():
    if not FIXTURES.is_dir():
        return []
    variants = fixture_json("golden.json")["variants"]
    return [pytest.param(v, c, id=f"{v}-{c['name']}") for v in VARIANTS for c in variants[v]["cases"]]


# ---- config mapping -----------------------------------------------------------------------------------------


def test_config_mapping_of_the_real_6b_config():
    real = fixture_json("config.json")
    assert is_chatglm_config(real)
    glm = chatglm_config_to_glm(real)
    assert glm.model_type == "glm" and glm.architectures == ["GlmForCausalLM"]
    assert (glm.num_hidden_layers, glm.hidden_size, glm.intermediate_size) == (28, 4096, 13696)
    assert (glm.num_attention_heads, glm.num_key_value_heads, glm.head_dim) == (32, 2, 128)
    assert glm.vocab_size == 65024 and glm.max_position_embeddings == 8192
    assert glm.rms_norm_eps == 1e-5  # not GlmConfig's 1.5625e-07
    assert glm.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert glm.attention_bias is True and glm.tie_word_embeddings is False and glm.hidden_act == "silu"
    assert (glm.pad_token_id, glm.eos_token_id, glm.bos_token_id) == (0, [2, 64795, 64797], None)


def test_config_mapping_of_the_tiny_variants():
    tiny = chatglm_config_to_glm(fixture_json("tiny-chatglm3/config.json"))
    assert (tiny.head_dim, tiny.hidden_size, tiny.num_key_value_heads) == (16, 16, 2)  # head_dim from kv_channels
    k32 = chatglm_config_to_glm(fixture_json("tiny-chatglm3-32k/config.json"))
    assert k32.rope_parameters["rope_theta"] == 500000.0  # 10000 * rope_ratio 50
    assert k32.max_position_embeddings == 32768


def test_config_mapping_without_multi_query_attention():
    config = fixture_json("config.json") | {"multi_query_attention": False}
    assert chatglm_config_to_glm(config).num_key_value_heads == 32


V1_CONFIG = {  # THUDM/chatglm-6b (v1)
    "architectures": ["ChatGLMModel"], "model_type": "chatglm", "bos_token_id": 130004, "eos_token_id": 130005,
    "hidden_size": 4096, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05, "max_sequence_length": 2048,
    "num_attention_heads": 32, "num_layers": 28, "position_encoding_2d": True, "vocab_size": 130528,
}  # fmt: skip


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (V1_CONFIG, "ChatGLM-6B (v1)"),
        ("chatglm2", "ChatGLM2-6B"),
        ({"padded_vocab_size": 151552, "rope_ratio": 500}, "glm-4-9b-chat-hf"),
        ({"rmsnorm": False}, "unsupported ChatGLM variant"),
        ({"pre_seq_len": 128}, "P-tuning"),
        ({"kv_channels": None}, "kv_channels"),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "not a chatglm checkpoint"),
    ],
)
def test_unmappable_configs_raise_a_clear_error(config, message):
    if config == "chatglm2":
        config = fixture_json("config.json") | {"_name_or_path": "THUDM/chatglm2-6b"}
    elif config is not V1_CONFIG:
        config = {k: v for k, v in (fixture_json("config.json") | config).items() if v is not None}
    with pytest.raises(EngineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        chatglm_config_to_glm(config)


def test_unmappable_checkpoint_fails_before_reading_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V1_CONFIG))
    with pytest.raises(EngineError, match="THUDM/chatglm3-6b"):
        load_chatglm3(tmp_path, dtype=torch.float32)


# ---- numerics against the original ----------------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "case"), golden_cases())
def test_logits_match_the_original(models, variant, case):
    model, name = models[variant], case["name"]
    golden = load_file(FIXTURES / fixture_json("golden.json")["variants"][variant]["logits_file"])
    ids = torch.tensor([case["input_ids"]])
    assert torch.equal(ids[0], golden[f"{name}.input_ids"])
    with torch.no_grad():
        logits = model(ids, position_ids=torch.tensor([case["position_ids"]])).logits[0]
    assert logits.dtype == torch.float32

    def max_diff(a, b):
        return (a - b).abs().max().item()

    assert max_diff(logits[-1], golden[f"{name}.logits_last"]) < TOL
    assert max_diff(logits[:, golden[f"{name}.cols"]], golden[f"{name}.logits_cols"]) < TOL
    assert max_diff(logits.max(-1).values, golden[f"{name}.row_max"]) < TOL
    assert max_diff(logits.logsumexp(-1), golden[f"{name}.row_logsumexp"]) < TOL
    assert torch.equal(logits.argmax(-1), golden[f"{name}.row_argmax"])
    assert torch.equal(logits.topk(10, dim=-1).indices, golden[f"{name}.topk_indices"])


@pytest.mark.parametrize(("variant", "case"), golden_cases())
def test_greedy_generation_matches_the_original(models, variant, case):
    ids = torch.tensor([case["input_ids"]])
    out = models[variant].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert out[0, ids.shape[1] :].tolist() == case["generated_ids"]


def test_generation_config(models):
    generation = models["tiny-chatglm3"].generation_config
    assert (generation.eos_token_id, generation.pad_token_id) == ([2, 64795, 64797], 0)


def test_rope_ratio_matters(models):
    # Guards the 32k mapping: with theta left at 10000 both variants would give the same logits.
    ids = torch.tensor([fixture_json("golden.json")["variants"]["tiny-chatglm3"]["cases"][1]["input_ids"]])
    with torch.no_grad():
        a, b = (models[v](ids).logits for v in VARIANTS)
    assert (a - b).abs().max().item() > 0.1
    for variant, theta in zip(VARIANTS, (1e4, 5e5), strict=True):
        inv_freq = models[variant].model.rotary_emb.inv_freq  # float32, not the original's fp16-rounded cache
        assert inv_freq.dtype == torch.float32
        assert torch.allclose(inv_freq, 1.0 / theta ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))


# ---- other checkpoint layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [True, False], ids=["sharded-bin-with-index", "single-bin"])
def test_bin_checkpoint_gives_identical_logits(models, tmp_path, index):
    state = load_file(FIXTURES / "tiny-chatglm3/model.safetensors")
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(FIXTURES / "tiny-chatglm3" / name, tmp_path / name)
    if index:
        keys = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for file, names in shards.items():
            torch.save({k: state[k] for k in names}, tmp_path / file)
        weight_map = {k: file for file, names in shards.items() for k in names}
        index_json = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index_json))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    model = load_chatglm3(tmp_path, dtype=torch.float32)
    ids = torch.tensor([fixture_json("golden.json")["variants"]["tiny-chatglm3"]["cases"][2]["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, models["tiny-chatglm3"](ids).logits)


def test_loaded_model_saves_as_a_native_glm_checkpoint(models, tmp_path):
    model = models["tiny-chatglm3"]
    assert type(model) is GlmForCausalLM
    model.save_pretrained(tmp_path)
    assert "model.layers.0.self_attn.k_proj.bias" in load_file(tmp_path / "model.safetensors")
    native = GlmForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.tensor([[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]])
    with torch.no_grad():
        assert torch.equal(native(ids).logits, model(ids).logits)
