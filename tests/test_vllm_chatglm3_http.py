"""ChatGLM3 over HTTP on both engines: the same greedy answers and the same forced tool call from the native engine
and from glm-serve on a real vLLM, on a random ChatGLM3 checkpoint with the real 6B head layout (vLLM cannot run
the tiny fixture: its head size 4 is refused by vLLM's CPU attention)."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from tests.conftest import vllm_env
from tests.support import CHATGLM3_FIXTURES, running_server

ENV = {"DTYPE": "float32", "EMBEDDING_PATH": "none", "WEB_UI": "false", "SERVED_MODEL_NAME": "chatglm3-6b",
       "MAX_MODEL_LEN": "1024"}
TOOLS = [{"type": "function", "function": {"name": name, "description": what, "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
    for name, what in (("get_weather", "The weather in a city"), ("get_time", "The time in a city"))]
ANSWER_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
                 "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
CHATS = [
    [{"role": "user", "content": "你好，请介绍一下你自己。"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
]


@pytest.fixture(scope="module")
def glm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glm-vllm-shape") / "chatglm3"
    subprocess.run([sys.executable, str(CHATGLM3_FIXTURES / "make_vllm_shape.py"), str(folder),
                    str(CHATGLM3_FIXTURES)], check=True, capture_output=True)
    return folder


def answers(server) -> list:
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)
    out = []
    for messages in CHATS:
        r = client.chat.completions.create(model="chatglm3-6b", messages=messages, temperature=0, max_tokens=24)
        s = client.chat.completions.create(model="chatglm3-6b", messages=messages, temperature=0, max_tokens=24,
                                           stream=True, stream_options={"include_usage": True})
        chunks = list(s)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == r.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        out.append((r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens,
                    r.usage.completion_tokens))
    # "required" with two tools: the whole answer is constrained by one grammar (a tool name as the metadata line,
    # then its tool_call(...)): xgrammar in the native sampler, vLLM's own xgrammar on the vLLM engine.
    r = client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "Weather?"}],
                                       tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80)
    calls = r.choices[0].message.tool_calls or []
    out.append((r.choices[0].finish_reason, [(c.function.name, c.function.arguments) for c in calls],
                r.usage.prompt_tokens, r.usage.completion_tokens))
    r = client.chat.completions.create(model="chatglm3-6b", messages=CHATS[0], temperature=0, max_tokens=120,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "answer", "strict": True, "schema": ANSWER_SCHEMA}})
    out.append((r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens))
    return out


def test_native_and_vllm_give_the_same_chatglm3_answers(glm_folder):
    env = {**ENV, "MODEL_PATH": str(glm_folder)}
    with running_server(env, name="glm-http-native") as srv:
        native = answers(srv)
    with running_server({**env, **vllm_env()}, name="glm-http-vllm", timeout=900) as srv:
        vllm = answers(srv)
    assert vllm == native
    assert all(a[0] for a in native[:2]) and native[0][2] > 0
    reason, calls, _, _ = native[2]
    assert reason == "tool_calls" and calls[0][0] in {"get_weather", "get_time"}
    assert set(json.loads(calls[0][1])) <= {"city"}
    content, reason, _ = native[3]
    assert reason == "stop" and set(json.loads(content)) == {"ok", "n"}
