"""ChatGLM3 end to end: the real server on the tiny ChatGLM3 checkpoint, against THUDM's golden greedy ids.

A random tiny model never emits a tool call by itself, so the tool tests drive the real streaming path with the
real model wrapped (in this file only) so that its scores force a recorded ChatGLM3 answer token by token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

from tests.support import CHATGLM3_FIXTURES, ThreadedServer, running_server

ENV = {"DTYPE": "float32", "EMBEDDING_PATH": "none", "WEB_UI": "false", "SERVED_MODEL_NAME": "chatglm3-6b"}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "required": ["location"], "properties": {
        "location": {"type": "string", "maxLength": 16}, "unit": {"type": "string", "maxLength": 16},
        "days": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4},
        "detail": {"type": "object", "properties": {"wind": {"type": "boolean"}, "n": {"type": "number"}}}}}}}


def _golden():
    return json.loads((CHATGLM3_FIXTURES / "golden.json").read_text())["variants"]


def _variant_dir(variant: str, tmp: Path) -> Path:
    if variant == "tiny-chatglm3":
        return CHATGLM3_FIXTURES / "tiny-chatglm3"
    folder = tmp / variant  # the 32k variant ships only its config: complete it with the shared weights
    shutil.copytree(CHATGLM3_FIXTURES / "tiny-chatglm3", folder)
    shutil.copy(CHATGLM3_FIXTURES / variant / "config.json", folder / "config.json")
    return folder


@pytest.fixture(scope="module", params=["tiny-chatglm3", "tiny-chatglm3-32k"])
def glm_server(request, tmp_path_factory):
    folder = _variant_dir(request.param, tmp_path_factory.mktemp("glm"))
    with running_server({**ENV, "MODEL_PATH": str(folder)}, name=request.param) as srv:
        yield request.param, srv


def _messages(case: dict) -> list[dict]:
    """The golden case's THUDM-format history as OpenAI messages."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in case["history"]]
    return msgs + [{"role": case["role"], "content": case["query"]}]


def _expected_text(ids: list[int]) -> str:
    from server.families.chatglm3 import ChatGLM3Family, ChatGLM3Tokenizer

    family = ChatGLM3Family(ChatGLM3Tokenizer(CHATGLM3_FIXTURES / "tokenizer.model"))
    parser = family.build_prompt(_request([{"role": "user", "content": "x"}])).parser
    events = parser.feed(family.decode(ids))
    events += parser.finish("length")[0]
    return "".join(getattr(e, "text", "") for e in events)


def _request(messages, **kw):
    from server.types import ChatRequest, SamplingParams

    return ChatRequest(messages=messages, sampling=SamplingParams(temperature=0), **kw)


@pytest.mark.parametrize("case_index", [0, 1])  # zh_single_turn, system_multi_turn_en (no tool-call history)
def test_greedy_through_http_equals_thudm_goldens(glm_server, case_index):
    variant, server = glm_server
    case = _golden()[variant]["cases"][case_index]
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    r = client.chat.completions.create(model="chatglm3-6b", messages=_messages(case), temperature=0,
                                       max_tokens=len(case["generated_ids"]))
    assert r.usage.prompt_tokens == case["num_prompt_tokens"]
    assert r.usage.completion_tokens == len(case["generated_ids"])
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == _expected_text(case["generated_ids"])
    stream = client.chat.completions.create(model="chatglm3-6b", messages=_messages(case), temperature=0,
                                            max_tokens=len(case["generated_ids"]), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content


def test_tools_in_prompt_keep_the_system_message(glm_server):
    _, server = glm_server
    body = {"model": "chatglm3-6b", "max_tokens": 2, "temperature": 0, "tools": [WEATHER_TOOL],
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]}
    with_tools = httpx.post(server.base_url + "/chat/completions", json=body, timeout=120).json()
    body["tool_choice"] = "none"
    without = httpx.post(server.base_url + "/chat/completions", json=body, timeout=120).json()
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 20


# -- tool calls through the real streaming path, forced by a wrapped model ---------------------------------------


class ForcedAnswer:
    """Makes the model emit `ids` (one per step), whatever the weights say."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, seq, logits: torch.Tensor) -> torch.Tensor:
        step = len(seq.generated)
        forced = torch.full_like(logits, float("-inf"))
        forced[self.ids[min(step, len(self.ids) - 1)]] = 0.0
        return forced


class SteeredModel(torch.nn.Module):
    """Test-only: the real tiny model whose next-token scores `steer(seq, row)` rewrites before the engine samples.

    It follows one sequence at a time (the tests send one request at a time): a call with several input ids is a
    prefill and starts a new answer, a one-token call continues it with the token the engine picked.
    """

    def __init__(self, model, steer):
        super().__init__()
        self.inner, self.steer = model, steer
        self.seq = SimpleNamespace(prompt_ids=[], generated=[])

    def __getattr__(self, name):  # device, config, ...: the wrapped model's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        if kwargs.get("attention_mask") is None:  # prefill (the scheduler passes a mask only when decoding)
            self.seq = SimpleNamespace(prompt_ids=input_ids[0].tolist(), generated=[])
        else:
            self.seq.generated.append(int(input_ids[0, -1]))
        out.logits[0, -1] = self.steer(self.seq, out.logits[0, -1])
        return out


@pytest.fixture(scope="module")
def glm_engine_factory():
    from server.app import create_app
    from server.backends.native.backend import NativeBackend
    from server.backends.native.device import place
    from server.backends.native.loader import load_chat_model
    from server.config import Settings
    from server.serving.chat import ChatService

    loaded = load_chat_model(str(CHATGLM3_FIXTURES / "tiny-chatglm3"), place("cpu", "float32"), cache_dir="/tmp")
    tok = loaded.family.tokenizer
    model = loaded.model

    def serve(answer_metadata: str, answer_body: str, hook=None):
        ids = tok.sp_encode(answer_metadata + "\n") + tok.sp_encode(answer_body) + [tok.observation_token_id]
        body_only = tok.sp_encode(answer_body) + [tok.observation_token_id]

        def forced_answer(seq, logits):
            # With a forced tool (named tool_choice) the prompt already ends in the metadata line.
            forced = ids if seq.prompt_ids[-1] == tok.assistant_token_id else body_only
            return ForcedAnswer(forced)(seq, logits)

        loaded.model = SteeredModel(model, hook or forced_answer)
        chat = ChatService(loaded.family, NativeBackend(loaded), model_id="chatglm3-6b")
        settings = Settings(embedding_path="none", web_ui=False)
        return ThreadedServer(create_app(settings, engine=chat))

    serve.tokenizer = tok
    return serve


# Python literals where the schema is a plain string, JSON inside: what a call constrained to the schema may say
# (forced tool_choice), and what the parser reads from an unconstrained one.
CALL = "```python\ntool_call(location='北京', unit='celsius', days=[1, 2], detail={\"wind\": true, \"n\": 1.5})\n```"
ARGS = {"location": "北京", "unit": "celsius", "days": [1, 2], "detail": {"wind": True, "n": 1.5}}


def test_tool_call_non_streaming_and_streaming(glm_engine_factory):
    with glm_engine_factory("get_current_weather", CALL) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "北京天气怎么样？"}]
        r = client.chat.completions.create(model="chatglm3-6b", messages=msgs, tools=[WEATHER_TOOL])
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name == "get_current_weather"
        assert json.loads(call.function.arguments) == ARGS

        chunks = list(client.chat.completions.create(model="chatglm3-6b", messages=msgs, tools=[WEATHER_TOOL],
                                                     stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
        assert calls[0].function.name == "get_current_weather" and calls[0].id
        assert json.loads("".join(c.function.arguments or "" for c in calls)) == ARGS
        assert not "".join(d.content or "" for d in deltas)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            "tool_calls"]


def test_tool_history_round_trip_and_named_tool_choice(glm_engine_factory):
    with glm_engine_factory("get_current_weather", CALL) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        history = [
            {"role": "user", "content": "北京天气怎么样？"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_current_weather", "arguments": json.dumps(ARGS, ensure_ascii=False)}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
        ]
        r = client.chat.completions.create(model="chatglm3-6b", messages=history, tools=[WEATHER_TOOL],
                                           tool_choice={"type": "function",
                                                        "function": {"name": "get_current_weather"}})
        assert r.choices[0].finish_reason == "tool_calls"
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == ARGS


def test_legacy_functions_answer_with_function_call(glm_engine_factory):
    with glm_engine_factory("get_current_weather", CALL) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        r = client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "天气？"}],
                                           functions=[WEATHER_TOOL["function"]])
        assert r.choices[0].finish_reason == "function_call"
        assert r.choices[0].message.function_call.name == "get_current_weather"
        assert json.loads(r.choices[0].message.function_call.arguments) == ARGS


def test_malicious_tool_call_is_plain_text_and_never_runs(glm_engine_factory, tmp_path):
    marker = tmp_path / "pwned"
    evil = f"```python\ntool_call(location=__import__('os').system('touch {marker}'))\n```"
    with glm_engine_factory("get_current_weather", evil) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        r = client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "hi"}],
                                           tools=[WEATHER_TOOL])
        assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
        assert "__import__" in r.choices[0].message.content
    assert not marker.exists()


TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                              "parameters": {"type": "object", "properties": {}}}}


def test_required_tool_choice_constrains_the_answer_to_a_tool_call(glm_engine_factory):
    """The model (steered by a hook) would rather answer in text; "required" must still get one of the tools, and
    its arguments as the tool's schema has them (the grammar spells the metadata line and the call)."""
    tok = glm_engine_factory.tokenizer
    names = ["get_current_weather", "get_time"]
    text_answer = tok.sp_encode("\n") + tok.sp_encode("It is sunny.")  # empty metadata line: plain text
    metadata_lines = [tok.sp_encode(f"{name}\n") for name in names]
    body = tok.sp_encode(CALL) + [tok.observation_token_id]

    def force(token, logits):
        forced = torch.full_like(logits, float("-inf"))
        forced[token] = 0.0
        return forced

    def prefers_text(seq, logits):
        done = seq.generated
        for line in metadata_lines:  # a tool's metadata line is written: what follows is the call
            if done[: len(line)] == line:
                return force(body[min(len(done) - len(line), len(body) - 1)], logits)
        if done == text_answer:
            return force(tok.eos_token_id, logits)
        steered = logits.clone()  # a strong preference, not a force: the constraint may still overrule it
        if len(done) < len(text_answer) and done == text_answer[: len(done)]:
            steered[text_answer[len(done)]] += 100.0
        return steered

    with glm_engine_factory("unused", CALL, hook=prefers_text) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "北京天气怎么样？"}]
        tools = [WEATHER_TOOL, TIME_TOOL]
        auto = client.chat.completions.create(model="chatglm3-6b", messages=msgs, tools=tools, max_tokens=40)
        assert auto.choices[0].message.content == "It is sunny." and not auto.choices[0].message.tool_calls

        required = client.chat.completions.create(model="chatglm3-6b", messages=msgs, tools=tools,
                                                  tool_choice="required", max_tokens=80, temperature=0)
        choice = required.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
        call = choice.message.tool_calls[0].function
        assert call.name in names
        arguments = json.loads(call.arguments)
        if call.name == "get_time":
            assert arguments == {}
        else:
            assert isinstance(arguments["location"], str) and set(arguments) <= set(WEATHER_TOOL["function"][
                "parameters"]["properties"])

        chunks = list(client.chat.completions.create(model="chatglm3-6b", messages=msgs, tools=tools,
                                                     tool_choice="required", max_tokens=80, temperature=0,
                                                     stream=True))
        calls = [d.tool_calls[0] for c in chunks if c.choices for d in [c.choices[0].delta] if d.tool_calls]
        assert calls[0].function.name == choice.message.tool_calls[0].function.name  # greedy: the same tool
        assert "".join(c.function.arguments or "" for c in calls) == call.arguments
