"""POST /v1/completions (legacy) on both engines: the real server on the embedded SmolLM2, via the openai SDK,
httpx and curl. Raw prompts (no chat template), echo, n, stop, list and token prompts (the legacy logprobs shape is
in test_logprobs.py, with the engines that report logprobs)."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


def complete(client, prompt=PROMPT, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


def stream(client, prompt=PROMPT, **kw) -> tuple[dict, list]:
    """Choice index -> (joined text, logprob lists, finish reason); and the chunks."""
    chunks = list(complete(client, prompt, stream=True, stream_options={"include_usage": True}, **kw))
    out: dict = {}
    for c in chunks:
        for ch in c.choices:
            text, tokens, lps, offsets, reason = out.get(ch.index, ("", [], [], [], None))
            if ch.logprobs:
                tokens, lps = tokens + ch.logprobs.tokens, lps + ch.logprobs.token_logprobs
                offsets = offsets + ch.logprobs.text_offset
            out[ch.index] = (text + ch.text, tokens, lps, offsets, ch.finish_reason or reason)
    return out, chunks


@pytest.fixture(scope="module")
def tokenizer(engine_server):
    from transformers import AutoTokenizer

    from tests.test_api_chat import _converted_dir

    return AutoTokenizer.from_pretrained(_converted_dir(engine_server))


def test_raw_prompt_shape_and_usage(engine_client, tokenizer):
    r = complete(engine_client)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL and r.created > 0
    choice = r.choices[0]
    assert choice.index == 0 and choice.text and choice.finish_reason in ("stop", "length")
    # no chat template: the prompt is the tokenizer's own encoding of the text
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the answer continues the text: as token ids it is exactly what the string prompt gave
    ids = tokenizer.encode(PROMPT)
    same = complete(engine_client, ids)
    assert same.choices[0].text == choice.text and same.usage == r.usage
    assert complete(engine_client, [ids]).choices[0].text == choice.text


def test_default_max_tokens_is_16(engine_client):
    r = engine_client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens <= 16
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 16


def test_stream_equals_non_stream_with_usage(engine_client):
    r = complete(engine_client, max_tokens=12)
    out, chunks = stream(engine_client, max_tokens=12)
    assert out[0][0] == r.choices[0].text and out[0][4] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)


def test_echo(engine_client):
    plain = complete(engine_client).choices[0].text
    r = complete(engine_client, echo=True)
    assert r.choices[0].text == PROMPT + plain
    out, _ = stream(engine_client, echo=True)
    assert out[0][0] == PROMPT + plain


def test_n_choices_and_seed(engine_client):
    a = complete(engine_client, n=2, temperature=1.0, seed=7, max_tokens=12)
    b = complete(engine_client, n=2, temperature=1.0, seed=7, max_tokens=12)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == b.usage.completion_tokens
    out, _ = stream(engine_client, n=2, temperature=1.0, seed=7, max_tokens=12)
    assert [out[i][0] for i in (0, 1)] == [c.text for c in a.choices]


def test_stop_string(engine_client):
    full = complete(engine_client, max_tokens=16).choices[0].text
    word = next(w for w in full.split() if len(w) > 2 and full.index(w) > 0)
    r = complete(engine_client, max_tokens=16, stop=[word])
    assert r.choices[0].text == full[: full.index(word)] and r.choices[0].finish_reason == "stop"
    out, _ = stream(engine_client, max_tokens=16, stop=word)
    assert out[0][0] == r.choices[0].text


def test_list_prompts_and_token_prompts_with_n(engine_client, tokenizer):
    prompts = [PROMPT, "1, 2, 3, 4,"]
    alone = [complete(engine_client, p).choices[0].text for p in prompts]
    r = complete(engine_client, prompts, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    ids = complete(engine_client, [tokenizer.encode(p) for p in prompts])
    assert [c.text for c in ids.choices] == alone
    out, _ = stream(engine_client, prompts, n=2)
    assert [out[i][0] for i in range(4)] == [c.text for c in r.choices]


def test_logit_bias_forces_a_token(engine_client, tokenizer):
    banana = tokenizer.encode(" banana", add_special_tokens=False)
    assert len(banana) == 1
    r = complete(engine_client, max_tokens=3, logit_bias={str(banana[0]): 100})
    assert r.choices[0].text == " banana" * 3


def test_curl(engine_server):
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    out = subprocess.run(["curl", "-sS", "-H", "Content-Type: application/json", "-d", body,
                          engine_server.base_url + "/completions"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["object"] == "text_completion" and r["choices"][0]["text"] and r["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("extra, status, param", [
    ({"suffix": " and that is all."}, 400, "suffix"),
    ({"best_of": 2}, 400, "best_of"),
    ({"echo": True, "logprobs": 1}, 400, "logprobs"),
    ({"logprobs": 6}, 400, "logprobs"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[1, 2], []]}, 400, "prompt"),
    ({"prompt": [10_000_000]}, 400, "prompt"),
    ({"prompt": ""}, None, None),  # whatever the tokenizer makes of it: an answer or a clear 400, never a 500
    ({"max_tokens": 100_000}, 400, "prompt"),
    ({"logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"model": "nope"}, 404, "model"),
    ({"prompt": None}, 400, "prompt"),
])
def test_errors_are_openai_json(engine_server, extra, status, param):
    r = httpx.post(engine_server.base_url + "/completions", timeout=60,
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **extra})
    if status is None:
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200:
            return
    else:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param or err["param"].startswith(param), err


def test_best_of_equal_to_n_is_fine(engine_client):
    r = complete(engine_client, best_of=2, n=2, max_tokens=2)
    assert len(r.choices) == 2
