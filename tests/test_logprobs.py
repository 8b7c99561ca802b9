"""logprobs / top_logprobs and logit_bias on chat completions, on both engines (the real server, the openai SDK).

The values are the raw model distribution (vLLM's default): the greedy token is the top-1, the top lists come
sorted, streamed entries equal the non-streamed ones, and a stop string trims them with the text.
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from safetensors.numpy import load_file

from tests.support import CHATGLM3_FIXTURES, running_server

MODEL = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "Name three fruits."}]
# Not on llama.cpp: llama-server sends no event (so no probabilities) for a token whose text ends inside a UTF-8
# character; logprobs there are a 400 (tests/test_llamacpp.py).
ONLY_ENGINES = ["native", "vllm"]


def ask(client, **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=kw.pop("model", MODEL), messages=kw.pop("messages", MSG), **kw)


def streamed(client, **kw):
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    return text, entries, chunks[-1].usage


def joined(entries) -> str:
    return b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace")


def same(a, b, tol=1e-4) -> bool:
    return (len(a) == len(b) and all(x.token == y.token and x.bytes == y.bytes and abs(x.logprob - y.logprob) < tol
                                     and [t.token for t in x.top_logprobs] == [t.token for t in y.top_logprobs]
                                     for x, y in zip(a, b)))


def test_greedy_logprobs_shape_top1_sorted_and_counted(engine_client):
    r = ask(engine_client, logprobs=True, top_logprobs=5)
    choice = r.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        assert len(e.top_logprobs) == 5
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert e.top_logprobs[0].token == e.token and math.isclose(e.top_logprobs[0].logprob, e.logprob,
                                                                   abs_tol=1e-5)
        assert e.bytes == list(e.token.encode()) or "\\x" in e.token
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1.0 + 1e-4
    # The entries are the answer's tokens: their bytes join to its text (plus the stop token, when one ended it).
    text = joined(entries)
    if choice.finish_reason == "stop":
        assert text == choice.message.content + entries[-1].token
    else:
        assert text == choice.message.content


def test_stream_equals_non_stream(engine_client):
    r = ask(engine_client, logprobs=True, top_logprobs=3)
    text, entries, usage = streamed(engine_client, logprobs=True, top_logprobs=3)
    assert text == r.choices[0].message.content
    assert same(entries, r.choices[0].logprobs.content)
    assert len(entries) == usage.completion_tokens


def test_logprobs_without_top_and_off(engine_client):
    r = ask(engine_client, logprobs=True, max_tokens=4)
    assert len(r.choices[0].logprobs.content) == 4
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    assert ask(engine_client, max_tokens=4).choices[0].logprobs is None


def test_values_are_the_raw_distribution_whatever_the_sampling(engine_client):
    """The first token's distribution depends on the prompt only: temperature, top_p and penalties leave it."""
    greedy = ask(engine_client, logprobs=True, top_logprobs=5, max_tokens=1).choices[0].logprobs.content[0]
    hot = ask(engine_client, logprobs=True, top_logprobs=5, max_tokens=1, temperature=1.7, top_p=0.5, seed=3,
              frequency_penalty=1.0, presence_penalty=1.0).choices[0].logprobs.content[0]
    assert [t.token for t in hot.top_logprobs] == [t.token for t in greedy.top_logprobs]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(hot.top_logprobs, greedy.top_logprobs))
    # the sampled token's value is its raw one (it is in the top list whenever it ranks there)
    top = {t.token: t.logprob for t in hot.top_logprobs}
    if hot.token in top:
        assert abs(top[hot.token] - hot.logprob) < 1e-4


def test_stop_string_trims_the_entries_with_the_text(engine_client):
    full = ask(engine_client, logprobs=True, top_logprobs=2, max_tokens=24).choices[0].logprobs.content
    text = joined(full)
    # a stop string that begins where a token begins, in the middle of the answer
    k = next(i for i in range(3, len(full)) if full[i].token.strip() and full[i].token not in joined(full[:i]))
    stop = full[k].token
    r = ask(engine_client, logprobs=True, top_logprobs=2, max_tokens=24, stop=[stop])
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert same(r.choices[0].logprobs.content, full[:k])
    assert r.usage.completion_tokens == k + 1  # the token holding the stop string was generated, not reported
    s_text, s_entries, _ = streamed(engine_client, logprobs=True, top_logprobs=2, max_tokens=24, stop=[stop])
    assert s_text == r.choices[0].message.content and same(s_entries, full[:k])


def _token_id(server, text: str) -> int:
    from transformers import AutoTokenizer

    from tests.test_api_chat import _converted_dir

    ids = AutoTokenizer.from_pretrained(_converted_dir(server)).encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_logit_bias_bans_and_forces_tokens(engine_client, engine_server):
    first = ask(engine_client, logprobs=True, max_tokens=3).choices[0].logprobs.content[0]
    banned = _token_id(engine_server, first.token)
    r = ask(engine_client, logprobs=True, max_tokens=3, logit_bias={str(banned): -100})
    assert r.choices[0].logprobs.content[0].token != first.token
    # the reported logprob stays the raw one: the bias changes what is sampled, not the distribution shown
    forced = _token_id(engine_server, " banana")
    r = ask(engine_client, logprobs=True, max_tokens=3, logit_bias={str(forced): 100})
    assert r.choices[0].message.content == " banana" * 3
    assert all(e.token == " banana" and e.logprob < 0 for e in r.choices[0].logprobs.content)
    # sampling honours it too
    r = ask(engine_client, max_tokens=3, temperature=1.0, seed=1, logit_bias={str(forced): 100})
    assert r.choices[0].message.content == " banana" * 3


@pytest.mark.parametrize("extra, param", [
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logit_bias": {"10000000": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
])
def test_bad_logprobs_and_logit_bias_are_400(engine_server, extra, param):
    r = httpx.post(engine_server.base_url + "/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": MSG, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param


def test_top_logprobs_20_on_both_engines(engine_client):
    e = ask(engine_client, logprobs=True, top_logprobs=20, max_tokens=2).choices[0].logprobs.content
    assert all(len(x.top_logprobs) == 20 for x in e)


def test_legacy_completions_logprobs(engine_client):
    from tests.test_completions import complete
    from tests.test_completions import stream as completion_stream

    r = complete(engine_client, logprobs=3, max_tokens=10)
    choice = r.choices[0]
    lp = choice.logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and token in top and top[token] == value  # the sampled token is always in it
        assert math.isclose(value, max(top.values()), abs_tol=1e-5)  # greedy: it is the most likely
    # offsets point into the text; the tokens spell it (plus the stop token, when one ended it)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    spelled = "".join(lp.tokens)
    assert spelled == choice.text or (choice.finish_reason == "stop" and spelled.startswith(choice.text))
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert choice.text[offset:offset + len(token)] == token or offset == len(choice.text)
    out, _ = completion_stream(engine_client, logprobs=3, max_tokens=10)
    assert out[0][1] == lp.tokens and out[0][3] == lp.text_offset
    assert all(abs(a - b) < 1e-4 for a, b in zip(out[0][2], lp.token_logprobs))
    zero = complete(engine_client, logprobs=0, max_tokens=3).choices[0].logprobs
    assert all(list(top) == [t] for t, top in zip(zero.tokens, zero.top_logprobs))

# -- ChatGLM3: the tiny checkpoint against THUDM's golden logits (native; vLLM cannot run its head size) -----------

def test_chatglm3_first_step_logprobs_equal_thudm_golden_logits():
    import json

    import numpy as np

    golden = json.loads((CHATGLM3_FIXTURES / "golden.json").read_text())["variants"]["tiny-chatglm3"]["cases"][0]
    logits = load_file(str(CHATGLM3_FIXTURES / "golden_logits_tiny-chatglm3.safetensors"))
    row = logits[f"{golden['name']}.logits_last"].astype(np.float64)
    expected = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
    order = np.argsort(-expected)[:5]
    env = {"DTYPE": "float32", "EMBEDDING_PATH": "none", "WEB_UI": "false", "SERVED_MODEL_NAME": "chatglm3-6b",
           "MODEL_PATH": str(CHATGLM3_FIXTURES / "tiny-chatglm3")}
    with running_server(env, name="logprobs-chatglm3") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": golden["query"]}]
        n = len(golden["generated_ids"])
        r = ask(client, model="chatglm3-6b", messages=messages, logprobs=True, top_logprobs=5, max_tokens=n)
        entries = r.choices[0].logprobs.content
        assert len(entries) == r.usage.completion_tokens == n
        first = entries[0]
        assert [t.logprob for t in first.top_logprobs] == pytest.approx(expected[order].tolist(), abs=1e-4)
        assert first.logprob == pytest.approx(float(expected[golden["generated_ids"][0]]), abs=1e-4)
        assert all(e.token == e.top_logprobs[0].token for e in entries)
        # the entries are THUDM's greedy ids, each with its sentencepiece piece ("▁" as a space)
        from server.families.chatglm3 import ChatGLM3Tokenizer

        tok = ChatGLM3Tokenizer(CHATGLM3_FIXTURES / "tokenizer.model")
        assert [e.token for e in entries] == [tok.piece_bytes(i).decode() for i in golden["generated_ids"]]
        text, s_entries, _ = streamed(client, model="chatglm3-6b", messages=messages, logprobs=True,
                                      top_logprobs=5, max_tokens=n)
        assert text == r.choices[0].message.content and same(s_entries, entries)
        # logit_bias on ChatGLM3's ids: ban the greedy first token
        r2 = ask(client, model="chatglm3-6b", messages=messages, logprobs=True, max_tokens=2,
                 logit_bias={str(golden["generated_ids"][0]): -100})
        assert r2.choices[0].logprobs.content[0].token != first.token


def test_zhipuai_sdk_sends_no_logprobs_and_gets_them_through_extra_body(server):
    """The zhipuai SDK has no logprobs parameter (it never sends one); extra_body reaches them, as an extra field."""
    from zhipuai import ZhipuAI

    client = ZhipuAI(api_key="glm-serve.local-secret", base_url=server.base_url + "/")
    plain = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, do_sample=False)
    assert plain.choices[0].message.content
    r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, do_sample=False,
                                       extra_body={"logprobs": True, "top_logprobs": 2})
    assert r.choices[0].message.content == plain.choices[0].message.content
    content = r.choices[0].logprobs["content"]
    assert len(content) == r.usage.completion_tokens and all(len(e["top_logprobs"]) == 2 for e in content)
