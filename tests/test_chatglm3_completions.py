"""ChatGLM3 on /v1/completions and with logprobs, on both engines: the raw prompt is THUDM's `tokenizer.encode`
(the golden encode cases), and the native engine and a real vLLM report the same logprobs and honour logit_bias
alike. On a random ChatGLM3 with the real 6B head layout (vLLM cannot run the tiny fixture's head size)."""

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
MODEL = "chatglm3-6b"


@pytest.fixture(scope="module")
def glm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glm-vllm-shape") / "chatglm3"
    subprocess.run([sys.executable, str(CHATGLM3_FIXTURES / "make_vllm_shape.py"), str(folder),
                    str(CHATGLM3_FIXTURES)], check=True, capture_output=True)
    return folder


def observe(server) -> dict:
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)
    cases = json.loads((CHATGLM3_FIXTURES / "tokenizer_cases.json").read_text())["encode_cases"]
    out: dict = {"raw": []}
    for case in cases:
        # the string prompt is encoded as THUDM's tokenizer.encode does ([gMASK, sop] + sentencepiece): the same
        # count and the same greedy continuation as sending the golden ids themselves
        by_text = client.completions.create(model=MODEL, prompt=case["text"], max_tokens=3, temperature=0,
                                            logprobs=2)
        by_ids = client.completions.create(model=MODEL, prompt=case["encode_default"], max_tokens=3, temperature=0,
                                           logprobs=2)
        assert by_text.usage.prompt_tokens == len(case["encode_default"]), case["text"]
        assert by_text.choices[0].text == by_ids.choices[0].text
        assert by_text.choices[0].logprobs.token_logprobs == pytest.approx(by_ids.choices[0].logprobs.token_logprobs,
                                                                            abs=1e-5)
        out["raw"].append((by_text.choices[0].text, by_text.choices[0].logprobs.tokens,
                           by_text.choices[0].logprobs.token_logprobs))
    echo = client.completions.create(model=MODEL, prompt="你好", max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt="你好", max_tokens=4, temperature=0)
    assert echo.choices[0].text == "你好" + plain.choices[0].text
    messages = [{"role": "user", "content": "你好，请介绍一下你自己。"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12,
                                          logprobs=True, top_logprobs=5)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens
    assert all(e.token == e.top_logprobs[0].token for e in entries)
    out["chat"] = [(e.token, e.logprob, [t.token for t in e.top_logprobs], [t.logprob for t in e.top_logprobs])
                   for e in entries]
    # ban the greedy first token: another one comes first, and its raw logprob is what the model gave it
    first = entries[0]
    banned = {str(i): -100 for i in token_ids(first.token)}
    biased = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=2,
                                            logprobs=True, top_logprobs=5, logit_bias=banned)
    b0 = biased.choices[0].logprobs.content[0]
    runner_up = next(t for t in first.top_logprobs if t.token != first.token)
    # the runner-up comes first, with the logprob the model gave it (the bias moves sampling, not the report)
    assert b0.token == runner_up.token and b0.logprob == pytest.approx(runner_up.logprob, abs=1e-4)
    out["biased"] = (b0.token, b0.logprob)
    return out


def token_ids(piece: str) -> list[int]:
    """Every id whose text is `piece` (a byte piece and a word piece can spell the same)."""
    from server.families.chatglm3 import ChatGLM3Tokenizer

    tok = ChatGLM3Tokenizer(CHATGLM3_FIXTURES / "tokenizer.model")
    ids = [i for i in range(tok.vocab_size) if tok.piece_bytes(i) == piece.encode()]
    assert ids, piece
    return ids


def test_chatglm3_completions_and_logprobs_on_both_engines(glm_folder):
    env = {**ENV, "MODEL_PATH": str(glm_folder)}
    with running_server(env, name="glm-cmpl-native") as srv:
        native = observe(srv)
    with running_server({**env, **vllm_env()}, name="glm-cmpl-vllm", timeout=900) as srv:
        vllm = observe(srv)
    for (nt, ntok, nlp), (vt, vtok, vlp) in zip(native["raw"], vllm["raw"]):
        assert vt == nt and vtok == ntok and vlp == pytest.approx(nlp, abs=1e-3)
    for n, v in zip(native["chat"], vllm["chat"], strict=True):
        assert v[0] == n[0] and v[2] == n[2]
        assert v[1] == pytest.approx(n[1], abs=1e-3) and v[3] == pytest.approx(n[3], abs=1e-3)
    assert vllm["biased"][0] == native["biased"][0]
    assert vllm["biased"][1] == pytest.approx(native["biased"][1], abs=1e-3)
