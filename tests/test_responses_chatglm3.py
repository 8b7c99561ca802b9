"""/v1/responses on ChatGLM3: function calls and their outputs render as ChatGLM3's own turns, token for token the
prompt /v1/chat/completions renders for the same conversation; stored responses belong to their API key, are
bounded, and survive a restart.

The tool-call tests drive the real path with the tiny checkpoint wrapped so that it answers as recorded (a random
tiny model never calls a tool by itself), the same wrapped model tests/test_api_chatglm3.py uses.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.sse import responses_stream_events as sse_events
from tests.support import CHATGLM3_FIXTURES, running_server
from tests.test_api_chatglm3 import ARGS, CALL, ENV, WEATHER_TOOL, ForcedAnswer, glm_engine_factory  # noqa: F401

MODEL = "chatglm3-6b"
TOOL = {"type": "function", "strict": True, **WEATHER_TOOL["function"]}  # the Responses layout: flat
TIME_TOOL = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
FORCED = {"type": "function", "name": "get_current_weather"}
QUESTION = "北京天气怎么样？"
OBSERVATION = '{"temperature": 22}'
ANSWER = "北京今天22度。"


@pytest.fixture
def glm(glm_engine_factory, monkeypatch, tmp_path):  # noqa: F811 (the imported fixture)
    """A server whose model calls the weather tool, or answers ANSWER once it has seen a tool's output; every
    prompt it was given is recorded."""
    monkeypatch.setenv("RESPONSES_STORE", str(tmp_path / "responses.sqlite3"))
    tok = glm_engine_factory.tokenizer
    call = tok.sp_encode(CALL) + [tok.observation_token_id]
    metadata = tok.sp_encode("get_current_weather\n")
    answer = tok.sp_encode("\n") + tok.sp_encode(ANSWER) + [tok.eos_token_id]
    prompts: list[list[int]] = []

    def steer(seq, logits):
        if not seq.generated:
            prompts.append(seq.prompt_ids)
        if tok.observation_token_id in seq.prompt_ids:
            return ForcedAnswer(answer)(seq, logits)
        forced_tool = seq.prompt_ids[-len(metadata):] == metadata  # a named tool_choice wrote the metadata line
        return ForcedAnswer(call if forced_tool else metadata + call)(seq, logits)

    with glm_engine_factory("unused", CALL, hook=steer) as srv:
        yield srv, openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120), prompts, tok


def test_function_call_round_trip_is_token_exact_with_chat(glm):
    srv, client, prompts, tok = glm
    r1 = client.responses.create(model=MODEL, input=QUESTION, tools=[TOOL], tool_choice=FORCED)
    [call] = r1.output
    assert r1.status == "completed" and r1.output_text == "" and r1.tool_choice.name == "get_current_weather"
    assert call.type == "function_call" and call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert call.name == "get_current_weather" and json.loads(call.arguments) == ARGS and call.status == "completed"
    assert r1.tools[0].strict is True and r1.usage.input_tokens == len(prompts[-1])
    first_prompt = prompts[-1]
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                   tools=[WEATHER_TOOL], tool_choice={"type": "function",
                                                                      "function": {"name": "get_current_weather"}})
    assert prompts[-1] == first_prompt

    output = {"type": "function_call_output", "call_id": call.call_id, "output": OBSERVATION}
    r2 = client.responses.create(model=MODEL, previous_response_id=r1.id, input=[output], tools=[TOOL])
    assert r2.output_text == ANSWER and r2.status == "completed"
    round_trip = prompts[-1]
    assert r2.usage.input_tokens == len(round_trip)
    # The tool's output is ChatGLM3's observation turn, and the model is asked to answer after it.
    assert round_trip[-(len(tok.sp_encode(OBSERVATION)) + 4):] == (
        [tok.observation_token_id] + tok.sp_encode("\n") + tok.sp_encode(OBSERVATION) + [tok.assistant_token_id])
    history = [{"role": "user", "content": QUESTION},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": call.call_id, "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": OBSERVATION}]
    same = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL])
    assert prompts[-1] == round_trip and same.choices[0].message.content == ANSWER

    # The same conversation sent as items, unstored: the call as a function_call item, then by item_reference.
    as_item = {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}
    for middle in (as_item, {"type": "item_reference", "id": call.id}):
        r = client.responses.create(model=MODEL, input=[{"role": "user", "content": QUESTION}, middle, output],
                                    tools=[TOOL], store=False)
        assert prompts[-1] == round_trip and r.output_text == ANSWER


def test_allowed_tools_narrow_the_prompt_like_chat(glm):
    _, client, prompts, _ = glm
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function",
                                                                     "name": "get_current_weather"}]}
    r = client.responses.create(model=MODEL, input=QUESTION, tools=[TOOL, TIME_TOOL], tool_choice=choice)
    assert r.output[0].type == "function_call" and json.loads(r.output[0].arguments) == ARGS
    narrowed = prompts[-1]
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                   tools=[WEATHER_TOOL], tool_choice="required")
    assert prompts[-1] == narrowed


def test_streamed_function_call_events(glm):
    srv, _, _, _ = glm
    body = {"model": MODEL, "input": QUESTION, "tools": [TOOL], "tool_choice": FORCED, "stream": True}
    events = sse_events(httpx.post(srv.base_url + "/responses", json=body, timeout=120).content)
    types = [e["type"] for e in events]
    n = types.count("response.function_call_arguments.delta")
    assert n >= 1 and types == ["response.created", "response.in_progress", "response.output_item.added",
                                *["response.function_call_arguments.delta"] * n,
                                "response.function_call_arguments.done", "response.output_item.done",
                                "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    added = events[2]["item"]
    assert added["type"] == "function_call" and added["arguments"] == "" and added["status"] == "in_progress"
    assert added["name"] == "get_current_weather" and added["call_id"].startswith("call_")
    joined = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert json.loads(joined) == ARGS and events[-3]["arguments"] == joined
    assert events[-1]["response"]["output"] == [{**added, "arguments": joined, "status": "completed"}]


def test_keys_own_their_responses_bounds_evict_the_oldest_and_a_restart_keeps_them(tmp_path):
    from zhipuai.core._jwt_token import generate_token

    env = {**ENV, "MODEL_PATH": str(CHATGLM3_FIXTURES / "tiny-chatglm3"), "API_KEYS": "key-a,zid.zsecret",
           "RESPONSES_STORE": str(tmp_path / "responses.sqlite3"), "RESPONSES_MAX_STORED": "3"}

    def client(srv, key):
        return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, timeout=120)

    def greedy(c, **kw):
        return c.responses.create(model=MODEL, temperature=0, max_output_tokens=kw.pop("max_output_tokens", 3), **kw)

    with running_server(env, name="responses-glm") as srv:
        a, z = client(srv, "key-a"), client(srv, "zid.zsecret")
        plain = greedy(a, input="你好", max_output_tokens=8)
        streamed = greedy(a, input="你好", max_output_tokens=8, stream=True)
        assert "".join(e.delta for e in streamed if e.type == "response.output_text.delta") == plain.output_text
        ids = [greedy(a, input=f"第{i}轮").id for i in range(3)]  # 5 stored, 3 kept: the oldest two go
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(plain.id)
        assert [a.responses.retrieve(i).id for i in ids] == ids

        for foreign in (lambda: z.responses.retrieve(ids[-1]), lambda: z.responses.delete(ids[-1]),
                        lambda: greedy(z, input="再来", previous_response_id=ids[-1])):
            with pytest.raises(openai.NotFoundError):
                foreign()
        # zhipuai's JWT (a new token per request) is the key that signed it: the same owner as the plain key.
        theirs = greedy(z, input="我的")
        assert client(srv, generate_token("zid.zsecret")).responses.retrieve(theirs.id).id == theirs.id
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(theirs.id)
        continued = greedy(a, input="再来", previous_response_id=ids[-1], store=False)
        kept = a.responses.retrieve(ids[-1]).model_dump()

    with running_server(env, name="responses-glm-restarted") as srv:
        a = client(srv, "key-a")
        assert a.responses.retrieve(ids[-1]).model_dump() == kept
        again = greedy(a, input="再来", previous_response_id=ids[-1], store=False)
        assert again.usage.input_tokens == continued.usage.input_tokens > plain.usage.input_tokens
        assert again.output_text == continued.output_text
