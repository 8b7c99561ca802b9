"""glm-serve on a real llama-server (built by .ci/llamacpp.sh): what only this engine has. The shared end-to-end
suites (test_api_chat, test_concurrency, test_responses) run on it through conftest's ENGINES.

- The same greedy answers as llama.cpp's own llama-server on the same GGUF and prompt ids (what we compare: our
  text and token counts against the raw server's ids decoded by the model's tokenizer; both run the Q4_1 GGUF, so
  neither is compared with the dequantized float32 native engine here).
- A SIGKILLed llama-server: the open request fails at once with a 503, /health says why, it is restarted.
- ChatGLM3 converted to GGUF (python -m server.convert, float32) gives the native engine's greedy answers through
  the API; its forced tool calls and JSON answers, constrained by llama.cpp's grammars, validate.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_ENV, LLAMA_SERVER, llamacpp_env
from tests.support import CHATGLM3_FIXTURES, free_port, running_server
from tests.test_structured_outputs import ASK, SEARCH, WEATHER, Person, check_calls
from tests.test_vllm_chatglm3_http import CHATS
from tests.test_vllm_chatglm3_http import ENV as GLM_ENV

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["Name three fruits.", "Repeat exactly: 你好，世界！🌍🚀 café naïve 日本語", "Count from 1 to 12."]


def test_startup_summary_names_the_engine_and_why(llamacpp_server):
    log = llamacpp_server.log_path.read_text()
    assert "Engine: llamacpp (ENGINE=llamacpp)" in log
    assert re.search(r"engine\s+llama\.cpp build 11434 from LLAMA_SERVER \(llama-server /completion", log)
    assert "llama.cpp| " in log  # its own log lines, tagged, in ours


def test_logprobs_are_a_400_and_logit_bias_is_honoured(llamacpp_server):
    r = httpx.post(llamacpp_server.base_url + "/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
    assert "ENGINE=llamacpp" in r.json()["error"]["message"]
    from tests.test_logprobs import _token_id

    forced = _token_id(llamacpp_server, " banana")
    client = openai.OpenAI(base_url=llamacpp_server.base_url, api_key="x", max_retries=0, timeout=300)
    for temperature in (0, 1.0):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           temperature=temperature, seed=1, logit_bias={str(forced): 100})
        assert r.choices[0].message.content == " banana" * 3


@pytest.mark.parametrize("schema, what", [
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": "^a.b$"}}}, "can match a quote"),
    ({"type": "object", "properties": {"s": {"type": "string", "maxLength": 5000}}}, "up to 5000 times"),
], ids=["pattern", "max_length"])
def test_what_llamacpp_grammars_cannot_express_is_a_400_before_anything_streams(llamacpp_server, schema, what):
    """The structured-output suite passes here (test_structured_outputs.py); these two schemas compile for the other
    engines but not exactly into llama.cpp's GBNF (tests/test_llamacpp_gbnf.py)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for stream in (False, True):
        r = httpx.post(llamacpp_server.base_url + "/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": stream,
            "response_format": fmt})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "response_format" and error["code"] == "invalid_schema", error
        assert what in error["message"] and "ENGINE=llamacpp" in error["message"], error


@pytest.fixture(scope="module")
def raw_llama():
    """llama.cpp's own server on the same GGUF, with its defaults but for the slots."""
    from server.config import EMBEDDED_CHAT, resolve_model_path

    port = free_port()
    proc = subprocess.Popen([LLAMA_SERVER, "-m", resolve_model_path(EMBEDDED_CHAT), "--host", "127.0.0.1", "--port",
                             str(port), "-np", "4", "--kv-unified", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_greedy_answers_equal_raw_llama_server(llamacpp_server, raw_llama):
    from transformers import AutoTokenizer

    from server.config import EMBEDDED_CHAT, Settings, resolve_model_path
    from server.model_files import model_folder

    tok = AutoTokenizer.from_pretrained(model_folder(resolve_model_path(EMBEDDED_CHAT), Settings().cache_dir))
    client = openai.OpenAI(base_url=llamacpp_server.base_url, api_key="x", max_retries=0, timeout=300)
    for text in PROMPTS:
        messages = [{"role": "user", "content": text}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        raw = httpx.post(raw_llama + "/completion", timeout=300, json={
            "prompt": ids, "n_predict": 40, "temperature": 0, "return_tokens": True}).json()
        ours = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
        eos = raw["stop_type"] == "eos"
        assert ours.choices[0].finish_reason == ("stop" if eos else "length")
        assert ours.usage.prompt_tokens == len(ids) and ours.usage.completion_tokens == len(raw["tokens"])
        answer = raw["tokens"][:-1] if eos else raw["tokens"]
        assert ours.choices[0].message.content == tok.decode(answer), text


def test_killed_llama_server_is_a_503_then_restarted():
    env = {**DEFAULT_ENV, **llamacpp_env(), "EMBEDDING_PATH": "none", "WEB_UI": "false"}
    with running_server(env, name="llamacpp-kill") as srv:
        body = {"messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 2000,
                "temperature": 0}
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=300)
        before = client.chat.completions.create(model=MODEL, messages=body["messages"], temperature=0, max_tokens=8)
        pid = int(re.search(r"llama\.cpp ready in [\d.]+ s \(pid (\d+)", srv.log_path.read_text())[1])
        result = {}

        def long_request():
            r = httpx.post(srv.base_url + "/chat/completions", json=body, timeout=300)
            result["status"], result["at"] = r.status_code, time.monotonic()
            result["body"] = r.json()

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(2.0)  # it is decoding now (2000 tokens take far longer)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        thread.join(60)
        assert result["status"] == 503 and result["at"] - killed < 10, result
        health = httpx.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503 and "llama.cpp" in health.text
        for _ in range(240):
            if httpx.get(srv.url + "/health", timeout=10).status_code == 200:
                break
            time.sleep(0.5)
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        again = client.chat.completions.create(model=MODEL, messages=body["messages"], temperature=0, max_tokens=8)
        assert again.choices[0].message.content == before.choices[0].message.content
        assert "llama.cpp exited (killed by SIGKILL)" in srv.log_path.read_text()


@pytest.fixture(scope="module")
def glm_gguf(tmp_path_factory):
    """The random ChatGLM3 with the 6B head layout, and its float32 GGUF from python -m server.convert."""
    folder = tmp_path_factory.mktemp("glm-llamacpp") / "chatglm3"
    subprocess.run([sys.executable, str(CHATGLM3_FIXTURES / "make_vllm_shape.py"), str(folder),
                    str(CHATGLM3_FIXTURES)], check=True, capture_output=True)
    gguf = folder.parent / "chatglm3.f32.gguf"
    subprocess.run([sys.executable, "-m", "server.convert", str(folder), str(gguf), "--type", "f32"], check=True,
                   capture_output=True)
    return folder, gguf


def glm_answers(server) -> list:
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)
    out = []
    for messages in CHATS:
        r = client.chat.completions.create(model="chatglm3-6b", messages=messages, temperature=0, max_tokens=24)
        out.append((r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens,
                    r.usage.completion_tokens))
    return out


def test_chatglm3_as_gguf_gives_the_native_answers(glm_gguf):
    folder, gguf = glm_gguf
    env = {**GLM_ENV, "MODEL_PATH": str(folder)}
    with running_server(env, name="glm-gguf-native") as srv:
        native = glm_answers(srv)
    # float32 weights and a float32 KV cache (llama.cpp's default cache is f16): the same numbers as native
    llama = llamacpp_env(LLAMACPP_GGUF=str(gguf), LLAMACPP_ARGS="--cache-type-k f32 --cache-type-v f32")
    with running_server({**env, **llama}, name="glm-gguf-llamacpp") as srv:
        assert glm_answers(srv) == native
        assert "LLAMACPP_GGUF" in srv.log_path.read_text()
        # structured outputs through llama.cpp's grammars: THUDM's tool_call(k=v) form and JSON after the metadata
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=300)
        msgs = [{"role": "user", "content": "北京天气怎么样？"}]
        for choice, names in (({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
                              ("required", {"get_weather", "search"})):
            for temperature in (0, 1.0):
                r = client.chat.completions.create(model="chatglm3-6b", messages=msgs, tools=[WEATHER, SEARCH],
                                                   tool_choice=choice, temperature=temperature, seed=3, max_tokens=150)
                assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
                check_calls(r.choices[0].message, names)
        r = client.chat.completions.parse(model="chatglm3-6b", messages=ASK, response_format=Person, temperature=0,
                                          max_tokens=400)
        assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Person)


def test_chatglm3_tokens_that_are_line_separators_stream_through(glm_gguf):
    """ChatGLM3 has a token for each of U+2028, U+2029 and U+0085, which llama-server's JSON leaves unescaped; the
    engine hop used to read its stream with httpx's aiter_lines, which splits there, and every such answer was a 500
    (a JSONDecodeError on half an event). /v1/completions, as chat strips whitespace from an answer like THUDM's."""
    folder, gguf = glm_gguf
    bias = {"31330": 100, "31178": 100, "31586": 100}  # the random model's logits reach ~90: not every step obeys
    with running_server({**GLM_ENV, "MODEL_PATH": str(folder), **llamacpp_env(LLAMACPP_GGUF=str(gguf))},
                        name="glm-gguf-separators") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=300)
        whole = client.completions.create(model="chatglm3-6b", prompt="hi", max_tokens=6, temperature=0,
                                          logit_bias=bias)
        assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
        assert {"\u2028", "\u2029", "\x85"} & set(whole.choices[0].text), whole.choices[0].text
        streamed = client.completions.create(model="chatglm3-6b", prompt="hi", max_tokens=6, temperature=0,
                                             logit_bias=bias, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
