"""LORA_MODULES: adapters served as model ids on one shared base, exactly as peft computes them, mixed in batches."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from server.backends.native.lora import AdapterError, attach_adapters, parse_lora_modules
from server.config import Settings
from tests.support import CHATGLM3_FIXTURES, ThreadedServer
from tests.tiny_models import hand_merged_chatglm3, make_chatglm3_lora, make_lora, tiny_chatglm3, tiny_llama

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Write a SQL query that counts users.", "Tell me a story about a fox."]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny_llama()
    # "sql.v1" holds a '.', which peft cannot use as an adapter name: the served id is mapped.
    return base, {"sql.v1": make_lora(base, root / "sql", seed=1, targets=["q_proj", "v_proj"]),
                  "chat": make_lora(base, root / "chat", seed=2, targets=ALL_LINEAR)}


def reference_answer(base, adapter, prompt: str) -> str:
    """What peft's own model generates greedily, decoded as the server's chat-template family decodes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    eos = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])}
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=sorted(eos),
                         pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    return tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)


@pytest.fixture(scope="module")
def expected(adapters):
    base, paths = adapters
    with torch.no_grad():
        return {(name, p): reference_answer(base, paths.get(name), p) for name in ("base", *paths) for p in PROMPTS}


@pytest.fixture(scope="module")
def server(adapters):
    from server.app import create_app

    base, paths = adapters
    settings = Settings(model_path=str(base), served_model_name="base", embedding_path="none", dtype="float32",
                        web_ui=False, max_running_requests=8,
                        lora_modules=",".join(f"{name}={path}" for name, path in paths.items()))
    app = create_app(settings)
    with ThreadedServer(app) as srv:
        srv.app = app
        yield srv


def ask(srv, model: str, prompt: str) -> str:
    r = httpx.post(srv.base_url + "/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
        "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_adapters_are_listed_as_models(server):
    models = {m["id"]: m for m in httpx.get(server.base_url + "/models", timeout=30).json()["data"]}
    assert {"base", "sql.v1", "chat"} <= set(models)
    assert models["sql.v1"].get("root", "base") == "base"


def test_each_model_answers_exactly_as_peft(server, expected):
    for model in ("base", "sql.v1", "chat"):
        assert ask(server, model, PROMPTS[0]) == expected[(model, PROMPTS[0])], model
    answers = {expected[(m, PROMPTS[0])] for m in ("base", "sql.v1", "chat")}
    assert len(answers) == 3  # the adapters change the answer, each its own way


def test_concurrent_requests_for_different_adapters_share_batches(server, expected):
    scheduler = server.app.state.engine.backend.scheduler
    batches: list[set] = []
    adapter_kwargs = scheduler._adapter_kwargs
    scheduler._adapter_kwargs = lambda seqs: (batches.append({s.adapter for s in seqs}), adapter_kwargs(seqs))[1]
    try:
        jobs = [(m, p) for _ in range(2) for m in ("base", "sql.v1", "chat") for p in PROMPTS]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: ask(server, *job), jobs))
    finally:
        del scheduler._adapter_kwargs
    for job, answer in zip(jobs, answers):
        assert answer == expected[job], job
    assert max(len(b) for b in batches) == 3  # base (None), sql_v1 and chat rows in one forward


def test_lora_on_a_4bit_base_mixes_rows_exactly(adapters):
    """QUANTIZATION=4bit + LORA_MODULES: peft's bitsandbytes LoRA layers take mixed batches too."""
    import bitsandbytes  # noqa: F401  (a dependency: missing is a failure)
    from transformers import AutoModelForCausalLM

    from server.backends.native.device import place

    base, paths = adapters
    p = place("cpu", "float32", "4bit")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=p.dtype, quantization_config=p.quantization_config)
    peft_model, keys = attach_adapters(model, paths)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]] * 3)
    names = ["__base__", keys["sql.v1"], keys["chat"]]
    with torch.no_grad():
        mixed = peft_model(input_ids=ids, adapter_names=names).logits
        alone = [peft_model(input_ids=ids[:1], adapter_names=[n]).logits[0] for n in names]
    for row, want in zip(mixed, alone):
        torch.testing.assert_close(row, want, atol=1e-5, rtol=0)
    assert (alone[1] - alone[0]).abs().max() > 0.1


def test_chatglm3_adapter_translates_exactly(tmp_path):
    """An adapter on query_key_value/dense/dense_h_to_4h/dense_4h_to_h, served on the native GLM model, gives the
    logits of the original fused weights with scale * B @ A added by hand."""
    from server.families.chatglm3 import load_chatglm3

    adapter, deltas = make_chatglm3_lora(tmp_path / "adapter")
    reference = load_chatglm3(hand_merged_chatglm3(tmp_path / "merged", deltas), dtype=torch.float32)
    plain = load_chatglm3(tiny_chatglm3(), dtype=torch.float32)
    served, keys = attach_adapters(load_chatglm3(tiny_chatglm3(), dtype=torch.float32), {"thudm-ft": str(adapter)})
    layer = served.base_model.model.model.layers[0]
    adapted = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
               layer.mlp.gate_up_proj, layer.mlp.down_proj]
    assert all(keys["thudm-ft"] in m.lora_A for m in adapted)
    ids = torch.tensor([[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]] * 2)
    with torch.no_grad():
        got = served(input_ids=ids, adapter_names=["__base__", keys["thudm-ft"]]).logits
        want_base = plain(input_ids=ids[:1]).logits[0]
        want_ft = reference(input_ids=ids[:1]).logits[0]
    torch.testing.assert_close(got[0], want_base, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want_ft, atol=1e-4, rtol=0)
    assert (want_ft - want_base).abs().max() > 0.1


def test_configuration_errors(tmp_path):
    assert parse_lora_modules(" a=/x , b = /y ,") == {"a": "/x", "b": "/y"}
    for bad, message in [("a", "not name=path"), ("a=/x,a=/y", "twice"), ("__base__=/x", "reserved")]:
        with pytest.raises(AdapterError, match=message):
            parse_lora_modules(bad)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        attach_adapters(torch.nn.Linear(2, 2), {"x": str(tmp_path)})
    if CHATGLM3_FIXTURES.exists():  # a ChatGLM3-named adapter on a Llama base
        from transformers import AutoModelForCausalLM

        adapter, _ = make_chatglm3_lora(tmp_path / "glm")
        with pytest.raises(AdapterError, match="not ChatGLM3"):
            attach_adapters(AutoModelForCausalLM.from_pretrained(tiny_llama()), {"x": str(adapter)})


def test_adapter_names_may_not_shadow_the_base_model():
    from server.bootstrap import _lora_modules

    settings = Settings(model_path="/m/base", model_aliases="gpt-3.5-turbo", lora_modules="gpt-3.5-turbo=/a")
    with pytest.raises(AdapterError, match="already name the base model"):
        _lora_modules(settings, "base")


def test_chatglm3_adapter_is_served_by_name(tmp_path):
    from server.app import create_app

    adapter, _ = make_chatglm3_lora(tmp_path / "adapter", seed=5)
    settings = Settings(model_path=str(tiny_chatglm3()), served_model_name="chatglm3", embedding_path="none",
                        dtype="float32", web_ui=False, lora_modules=f"thudm.ft={adapter}")
    with ThreadedServer(create_app(settings)) as srv:
        assert "thudm.ft" in {m["id"] for m in httpx.get(srv.base_url + "/models", timeout=30).json()["data"]}
        for model in ("chatglm3", "thudm.ft"):
            r = httpx.post(srv.base_url + "/chat/completions", timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 6})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
