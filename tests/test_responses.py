"""/v1/responses end to end on the embedded SmolLM2, on both engines: the openai SDK, the raw SSE events over httpx,
and the Vercel AI SDK in Node. Each prompt is checked against /v1/chat/completions on the same server: the same
road, so the same prompt token counts and the same greedy text."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import openai
import pytest

from tests.conftest import ENGINES, engine_env
from tests.sse import responses_stream_events as sse_events
from tests.support import REPO, running_server
from tests.test_concurrency import metric

MODEL = "SmolLM2-135M-Instruct"
NODE_DIR = REPO / "tests" / "node"


@pytest.fixture(scope="module", params=ENGINES)
def srv(request, tmp_path_factory):
    """The embedded SmolLM2 on each engine: the Responses API lives above the engine seam."""
    store = tmp_path_factory.mktemp("responses") / "responses.sqlite3"
    env = {"DTYPE": "float32", "EMBEDDING_PATH": "none", "WEB_UI": "false", "RESPONSES_STORE": str(store)}
    env = {**env, **engine_env(request.param)}
    with running_server(env, name=f"responses-{request.param}", timeout=900) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0, timeout=300)


def create(client, **kw):
    return client.responses.create(model=MODEL, temperature=0, max_output_tokens=kw.pop("max_output_tokens", 8), **kw)


def chat(client, messages, max_tokens=1):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)


def test_string_input_shape_usage_and_metadata(client):
    r = create(client, input="Name three fruits.", metadata={"ticket": "42"})
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL and r.created_at > 0
    assert r.metadata == {"ticket": "42"} and r.tools == [] and r.tool_choice == "auto"
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].text == r.output_text != ""
    reference = chat(client, [{"role": "user", "content": "Name three fruits."}], max_tokens=8)
    assert r.output_text == reference.choices[0].message.content
    assert r.usage.input_tokens == reference.usage.prompt_tokens
    assert r.usage.output_tokens == reference.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if reference.choices[0].finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert message.status == "incomplete"
    else:
        assert r.status == "completed" and r.incomplete_details is None


def test_item_list_with_instructions_renders_like_chat_messages(client):
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi, I am Ada."}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada!"}]},
             {"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "input_text", "text": "Name a "}, {"type": "input_text",
                                                                                       "text": "colour."}]}]
    r = create(client, input=items, instructions="You are helpful.", max_output_tokens=4)
    assert r.instructions == "You are helpful."
    reference = chat(client, [{"role": "system", "content": "You are helpful."},
                              {"role": "user", "content": "Hi, I am Ada."},
                              {"role": "assistant", "content": "Hello Ada!"},
                              {"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Name a colour."}], max_tokens=4)
    assert r.usage.input_tokens == reference.usage.prompt_tokens
    assert r.output_text == reference.choices[0].message.content


def test_stream_events_in_order_and_deltas_join_to_the_non_streamed_text(srv, client):
    body = {"model": MODEL, "input": "Name three fruits.", "temperature": 0, "max_output_tokens": 8}
    plain = create(client, input=body["input"])
    raw = httpx.post(srv.base_url + "/responses", json={**body, "stream": True}, timeout=300)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw.content)
    types = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed" if plain.status == "completed" else "response.incomplete"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    assert all(e["item_id"] == item_id and e["output_index"] == 0 for e in deltas)
    joined = "".join(e["delta"] for e in deltas)
    assert joined == plain.output_text == events[-4]["text"]
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == joined
    assert final["usage"] == plain.usage.model_dump(exclude_unset=True)
    # The SDK's own stream parser reads the same events into its types.
    streamed = list(create(client, input=body["input"], stream=True))
    assert [e.type for e in streamed][:2] == ["response.created", "response.in_progress"]
    assert "".join(e.delta for e in streamed if e.type == "response.output_text.delta") == plain.output_text


def test_previous_response_id_chain_of_three_turns(client):
    turns = ["My name is Ada.", "What is my name?", "Say it again."]
    r1 = create(client, input=turns[0], instructions="Be brief.", max_output_tokens=4)
    r2 = create(client, input=turns[1], previous_response_id=r1.id, max_output_tokens=4)
    r3 = create(client, input=turns[2], previous_response_id=r2.id, instructions="Answer in French.",
                max_output_tokens=4)
    assert r2.previous_response_id == r1.id and r3.previous_response_id == r2.id
    history = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": r1.output_text},
               {"role": "user", "content": turns[1]}]
    # Instructions belong to their own turn only: r2 renders none, r3 its own, and neither sees r1's.
    assert r2.usage.input_tokens == chat(client, history).usage.prompt_tokens
    history += [{"role": "assistant", "content": r2.output_text}, {"role": "user", "content": turns[2]}]
    expected = chat(client, [{"role": "system", "content": "Answer in French."}, *history], max_tokens=4)
    assert r3.usage.input_tokens == expected.usage.prompt_tokens
    assert r3.output_text == expected.choices[0].message.content
    assert r1.usage.input_tokens < r2.usage.input_tokens < r3.usage.input_tokens


def test_retrieve_delete_and_store_false(client):
    r = create(client, input="Hi", max_output_tokens=2)
    assert client.responses.retrieve(r.id).model_dump() == r.model_dump()
    assert client.responses.delete(r.id) is None
    for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.delete(r.id),
                 lambda: create(client, input="Hi", previous_response_id=r.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    kept_out = create(client, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept_out.id)


UNSUPPORTED = [
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"tools": [{"type": "function"}]}, "tools.0.name"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input.0.content.0"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type"),
    ({"input": [{"type": "item_reference", "id": "msg_unknown"}]}, "input.0.id"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"truncation": "auto"}, "truncation"),
    ({"max_tool_calls": 1}, "max_tool_calls"),
    ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "properties": {
        "n": {"type": "integer", "multipleOf": 2}}}}}}, "text.format"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice.type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"model": "no-such-model"}, "model"),
    ({"temperature": 3}, "temperature"),
    ({"input": []}, "input"),
]


@pytest.mark.parametrize(("fields", "param"), UNSUPPORTED, ids=[p for _, p in UNSUPPORTED])
def test_what_is_not_supported_is_a_clear_error_naming_the_field(srv, fields, param):
    r = httpx.post(srv.base_url + "/responses", json={"model": MODEL, "input": "Hi", **fields}, timeout=60)
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]
    if param == "text.format" and "multipleOf" in str(fields):
        assert "text.format.schema.properties.n.multipleOf" in error["message"]


def test_unknown_and_hint_fields_are_tolerated(srv):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 1, "service_tier": "auto", "user": "u-1",
            "prompt_cache_key": "k", "safety_identifier": "s", "stream_options": {"include_obfuscation": False},
            "include": ["reasoning.encrypted_content"], "text": {"format": {"type": "text"}, "verbosity": "low"},
            "reasoning": {"effort": None}, "truncation": "disabled", "background": False, "a_future_field": 1}
    r = httpx.post(srv.base_url + "/responses", json=body, timeout=300)
    assert r.status_code == 200, r.text


def test_a_client_that_disconnects_cancels_generation(srv):
    before = metric(srv.url, 'glm_serve_finished_sequences_total{reason="abort"}')
    body = {"model": MODEL, "input": "Tell me a long story.", "max_output_tokens": 400, "stream": True}
    with httpx.stream("POST", srv.base_url + "/responses", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("event: response.output_text.delta"):
                break  # the client goes away after the first token
    for _ in range(100):  # the slot is freed within a decode step or two
        if (metric(srv.url, 'glm_serve_finished_sequences_total{reason="abort"}') > before
                and metric(srv.url, "glm_serve_running_requests") == 0):
            break
        time.sleep(0.1)
    assert metric(srv.url, 'glm_serve_finished_sequences_total{reason="abort"}') == before + 1
    assert metric(srv.url, "glm_serve_running_requests") == 0


def test_vercel_ai_sdk_generate_text_and_stream_text(srv, client):
    """`createOpenAI({baseURL}).responses(model)`, as web apps built on the AI SDK call it (Node, tests/node)."""
    assert (NODE_DIR / "node_modules" / "ai").is_dir(), "the AI SDK is not installed: run `npm ci` in tests/node"
    prompt, tokens = "Name three fruits.", 6
    run = subprocess.run(["node", str(NODE_DIR / "responses_ai_sdk.mjs"), srv.base_url, MODEL, prompt, str(tokens)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    reference = chat(client, [{"role": "user", "content": prompt}], max_tokens=tokens)
    expected_finish = {"length": "length", "stop": "stop"}[reference.choices[0].finish_reason]
    for key in ("generated", "streamed"):
        assert got[key]["text"] == reference.choices[0].message.content, key
        assert got[key]["finishReason"] == expected_finish and got[key]["id"].startswith("resp_")
        assert got[key]["usage"]["inputTokens"] == reference.usage.prompt_tokens
        assert got[key]["usage"]["outputTokens"] == reference.usage.completion_tokens
        assert got[key]["warnings"] == []
    # The second turn sent the first answer back as an item_reference to the stored message: it rendered as the
    # assistant turn it was.
    assert got["sent"][1]["input"][1] == {"type": "item_reference",
                                          "id": client.responses.retrieve(got["generated"]["id"]).output[0].id}
    follow_up = chat(client, [{"role": "user", "content": prompt},
                              {"role": "assistant", "content": got["generated"]["text"]},
                              {"role": "user", "content": "Why?"}], max_tokens=tokens)
    assert got["followUp"]["usage"]["inputTokens"] == follow_up.usage.prompt_tokens
    assert got["followUp"]["text"] == follow_up.choices[0].message.content
