"""Chat completions end to end on both engines: the real server on the embedded SmolLM2, via openai and httpx."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

MSG = [{"role": "user", "content": "Name three fruits."}]


def greedy(client, messages=MSG, **kw):
    return client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, temperature=0,
                                          max_tokens=kw.pop("max_tokens", 24), **kw)


def stream_text(client, messages=MSG, **kw) -> tuple[list, str]:
    chunks = list(client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, temperature=0, stream=True,
        max_tokens=kw.pop("max_tokens", 24), **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return chunks, text


def test_models_lists_chat_alias_and_embedding(engine_client):
    ids = [m.id for m in engine_client.models.list().data]
    assert ids[0] == "SmolLM2-135M-Instruct"
    assert "gpt-3.5-turbo" in ids and "all-MiniLM-L6-v2" in ids
    assert engine_client.models.retrieve("gpt-3.5-turbo").id == "gpt-3.5-turbo"


def test_completion_shape_and_exact_usage(engine_client, engine_server):
    from transformers import AutoTokenizer

    r = greedy(engine_client)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.created > 0
    assert r.model == "SmolLM2-135M-Instruct"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    # usage counts the tokens of the rendered chat template exactly
    tok = AutoTokenizer.from_pretrained(_converted_dir(engine_server))
    expected = len(tok.apply_chat_template(MSG, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert r.usage.prompt_tokens == expected
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    generated = tok.encode(choice.message.content, add_special_tokens=False)
    # completion tokens = the text's tokens, plus the eos token when the model stopped by itself
    assert r.usage.completion_tokens == len(generated) + (1 if choice.finish_reason == "stop" else 0)


def _converted_dir(server) -> str:
    import re

    log = server.log_path.read_text()
    match = re.search(r"(?:cached in|converted copy of \S+ in) (\S+)", log)
    assert match, "the server logs where the converted GGUF copy lives"
    return match.group(1)


def test_alias_is_served(engine_client):
    r = engine_client.chat.completions.create(model="gpt-3.5-turbo", messages=MSG, max_tokens=4, temperature=0)
    assert r.model == "gpt-3.5-turbo" and r.choices[0].message.content


def test_max_tokens_gives_length(engine_client):
    r = greedy(engine_client, messages=[{"role": "user", "content": "Write a long story about a dragon."}],
               max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r2 = engine_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MSG,
                                               max_completion_tokens=3, temperature=0)
    assert r2.usage.completion_tokens == 3


def test_stream_equals_non_stream_and_has_openai_framing(engine_client):
    full = greedy(engine_client, max_tokens=30).choices[0].message.content
    chunks, text = stream_text(engine_client, max_tokens=30, stream_options={"include_usage": True})
    assert text == full
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format_ends_with_done(engine_server):
    body = {"messages": MSG, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", engine_server.base_url + "/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        assert json.loads(ln[6:])["object"] == "chat.completion.chunk"


def test_unicode_stream_never_splits_characters(engine_client):
    messages = [{"role": "user", "content": "Repeat exactly: 你好，世界！🌍🚀 café naïve 日本語"}]
    full = greedy(engine_client, messages=messages, max_tokens=40).choices[0].message.content
    chunks, text = stream_text(engine_client, messages=messages, max_tokens=40)
    assert text == full
    assert all("\ufffd" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_stop_string_spanning_tokens_is_cut_in_both_modes(engine_client):
    messages = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
    full = greedy(engine_client, messages=messages, max_tokens=60).choices[0].message.content
    middle = len(full) // 2
    stop = full[middle : middle + 5]  # five characters of digits, punctuation and spaces: several tokens
    assert len(stop) == 5, full
    r = greedy(engine_client, messages=messages, max_tokens=60, stop=[stop, "never-seen"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]
    chunks, text = stream_text(engine_client, messages=messages, max_tokens=60, stop=stop)
    assert text == full[: full.index(stop)]
    assert all(stop not in (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_seed_reproducible_and_n_choices(engine_client, request):
    batch_dependent(request)
    kw = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Tell me a fun fact."}],
              temperature=1.0, max_tokens=16, seed=1234)
    a = engine_client.chat.completions.create(n=3, **kw)
    b = engine_client.chat.completions.create(n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # choices differ from each other
    assert 3 < a.usage.completion_tokens <= 3 * 16  # summed over the choices; the prompt counted once
    single = engine_client.chat.completions.create(n=1, **kw)
    assert single.choices[0].message.content == a.choices[0].message.content


def test_streamed_n_choices_are_separated(engine_client, request):
    chunks = list(engine_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=MSG, n=2, temperature=0, max_tokens=8, stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts[0] and texts[1]  # each choice's deltas under its own index
    batch_dependent(request)  # the two greedy choices decode side by side: "1. Bananas" and "1. Grapes" once there
    assert texts[0] == texts[1]  # greedy: both choices identical


def test_penalties_and_sampling_params_are_accepted(engine_client):
    r = engine_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=MSG, max_tokens=12, temperature=0.7, top_p=0.9, seed=7,
        presence_penalty=0.5, frequency_penalty=0.5, extra_body={"repetition_penalty": 1.3, "top_k": 40})
    assert r.choices[0].message.content
    echo = [{"role": "user", "content": "Write the word 'hello' twenty times."}]
    plain = greedy(engine_client, messages=echo, max_tokens=24).choices[0].message.content
    penalized = greedy(engine_client, messages=echo, max_tokens=24, frequency_penalty=2.0).choices[0].message.content
    assert penalized != plain


def test_content_parts_and_system_and_multi_turn(engine_client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi! "}, {"type": "text", "text": "Who are you?"}]},
        {"role": "assistant", "content": "An assistant."},
        {"role": "user", "content": "Say hello."},
    ]
    assert greedy(engine_client, messages=messages, max_tokens=8).choices[0].message.content


def batch_dependent(request) -> None:
    """llama.cpp's CPU logits depend on how many sequences share the step (its server docs: not bit-for-bit identical
    for different batch sizes); seen here: greedy answers alone and in a batch of 8, and seeded choices of two runs,
    differed. Expected to fail there until that is pinned down (known, open)."""
    if request.node.callspec.params["engine_server"] == "llamacpp":
        request.applymarker(pytest.mark.xfail(reason="llama.cpp logits depend on the batch", strict=False))


def test_concurrent_requests_each_equal_alone(engine_server, request):
    batch_dependent(request)
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            async def ask(p):
                r = await client.post(engine_server.base_url + "/chat/completions", json={
                    "messages": [{"role": "user", "content": p}], "max_tokens": 20, "temperature": 0})
                return r.json()["choices"][0]["message"]["content"]

            alone = [await ask(p) for p in prompts]
            together = await asyncio.gather(*(ask(p) for p in prompts))
            return alone, together

    alone, together = asyncio.run(run())
    assert together == alone


@pytest.mark.parametrize(
    "payload, status, param",
    [
        ({"model": "nope", "messages": MSG}, 404, "model"),
        ({"messages": MSG, "temperature": 5}, 400, "temperature"),
        ({"messages": []}, 400, "messages"),
        ({}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None),
        ({"messages": MSG, "n": 0}, 400, "n"),
        ({"messages": MSG, "max_tokens": 100000}, 400, "messages"),
        ({"messages": MSG, "response_format": {"type": "json_schema"}}, 400, "response_format"),
        ({"messages": MSG, "tool_choice": "required"}, 400, "tool_choice"),
    ],
)
def test_errors_are_openai_json(engine_server, payload, status, param):
    r = httpx.post(engine_server.base_url + "/chat/completions", json=payload, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param


def test_prompt_too_long_reports_token_counts(engine_client):
    with pytest.raises(openai.BadRequestError) as info:
        greedy(engine_client, messages=[{"role": "user", "content": "hello " * 9000}])
    err = info.value.body
    assert err["code"] == "context_length_exceeded" and "8192" in err["message"]


def test_malformed_json_and_unknown_route(engine_server):
    r = httpx.post(engine_server.base_url + "/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(engine_server.url + "/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(engine_server.base_url + "/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_zhipuai_style_nulls_and_extras_are_tolerated(engine_server):
    body = {"model": "SmolLM2-135M-Instruct", "messages": MSG, "response_format": None, "thinking": None,
            "do_sample": False, "request_id": "abc", "user_id": "u1", "tools": None, "max_tokens": 5,
            "stop": None, "seed": None, "top_p": None, "temperature": None, "meta": {"x": 1}}
    r = httpx.post(engine_server.base_url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_chat_page_runs_only_its_own_script():
    """The browser tests (test_web_ui.py) run the page under this policy, so it is known to still work."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import Settings

    page = TestClient(create_app(Settings(embedding_path="none"))).get("/")  # no lifespan: nothing loads
    assert page.status_code == 200 and '<script src="static/app.js">' in page.text
    policy = dict(p.strip().split(" ", 1) for p in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'self'" and "script-src" not in policy  # so scripts: our origin only
    assert policy["frame-ancestors"] == "'none'" and page.headers["x-content-type-options"] == "nosniff"


def test_health_and_request_id(engine_server):
    r = httpx.get(engine_server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    r = httpx.get(engine_server.base_url + "/models", headers={"X-Request-ID": "trace-123"})
    assert r.headers["x-request-id"] == "trace-123"
