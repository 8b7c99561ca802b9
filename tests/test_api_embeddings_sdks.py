"""Embeddings, and the other clients users point at the server: zhipuai SDK, curl, LangChain."""

from __future__ import annotations

import base64
import json
import subprocess

import httpx
import numpy as np
import pytest


def test_embeddings_float_and_base64_agree_and_are_normalized(openai_client, server):
    texts = ["The cat sits on the mat.", "向量检索", "🙂"]
    b64 = openai_client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the SDK asks for base64
    floats = httpx.post(server.base_url + "/embeddings", json={"input": texts, "encoding_format": "float"}).json()
    raw = httpx.post(server.base_url + "/embeddings", json={"input": texts, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    a = np.array([d.embedding for d in b64.data])
    b = np.array([d["embedding"] for d in floats["data"]])
    assert a.shape == (3, 384)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(decoded, b[0], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert [d["index"] for d in floats["data"]] == [0, 1, 2]


def test_embedding_usage_uses_the_models_tokenizer(server):
    from transformers import AutoTokenizer

    from server.config import EMBEDDED_EMBEDDING, resolve_embedding_path

    tok = AutoTokenizer.from_pretrained(resolve_embedding_path(EMBEDDED_EMBEDDING))
    texts = ["hello world", "a somewhat longer sentence for counting"]
    r = httpx.post(server.base_url + "/embeddings", json={"input": texts}).json()
    assert r["usage"]["prompt_tokens"] == sum(len(tok(t)["input_ids"]) for t in texts)
    single = httpx.post(server.base_url + "/embeddings", json={"input": "hello world"}).json()
    assert len(single["data"]) == 1 and single["model"] == "all-MiniLM-L6-v2"


@pytest.mark.parametrize("payload, param", [
    ({"input": ["x"], "dimensions": 128}, "dimensions"),
    ({"input": []}, "input"),
    ({"input": [[1, 2, 3]]}, "input"),
    ({"input": ["x"], "model": "nope"}, "model"),
    ({"input": ["x"], "encoding_format": "int8"}, "encoding_format"),
])
def test_embedding_errors(server, payload, param):
    r = httpx.post(server.base_url + "/embeddings", json=payload)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param


def test_embeddings_same_text_same_vector_alone_or_batched(server):
    one = httpx.post(server.base_url + "/embeddings", json={"input": "same text"}).json()["data"][0]["embedding"]
    many = httpx.post(server.base_url + "/embeddings",
                      json={"input": ["other", "same text", "more"]}).json()["data"][1]["embedding"]
    np.testing.assert_allclose(one, many, atol=1e-5)


def test_zhipuai_sdk_chat_stream_and_embeddings(server):
    from zhipuai import ZhipuAI

    client = ZhipuAI(api_key="glm-serve.local-secret", base_url=server.base_url + "/")
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=8, temperature=0.5, do_sample=False)
    assert r.choices[0].message.content and r.usage.prompt_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
        do_sample=False, stream=True) if c.choices]
    assert "".join(pieces) == r.choices[0].message.content
    emb = client.embeddings.create(model="all-MiniLM-L6-v2", input=["你好"])
    assert len(emb.data[0].embedding) == 384


@pytest.mark.parametrize("backend", ["ChatGLM3", "ChatGPT"])
def test_remote_llm_wrappers(server, backend):
    """clients/remote_llm.py over both SDKs: model picking, chat == stream (greedy), embeddings, errors."""
    from clients import remote_llm

    llm = getattr(remote_llm, backend)(base_url=server.base_url, max_retries=0)
    assert llm.model == "SmolLM2-135M-Instruct" and llm.embedding_model == "all-MiniLM-L6-v2"
    answer = llm.chat("Say hello.", max_tokens=8, temperature=0)
    assert answer and "".join(llm.stream("Say hello.", max_tokens=8, temperature=0)) == answer
    vectors = llm.embed(["hello", "你好"])
    assert len(vectors) == 2 and len(vectors[0]) == 384
    with pytest.raises(remote_llm.RemoteLLMError, match="HTTP 404") as err:
        getattr(remote_llm, backend)(base_url=server.base_url, model="no-such-model", max_retries=0).chat("hi")
    assert err.value.status_code == 404


def test_curl_streaming(server):
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "stream": True})
    out = subprocess.run(["curl", "-sN", server.base_url + "/chat/completions", "-H",
                          "Content-Type: application/json", "-d", body], capture_output=True, text=True, timeout=120)
    events = [ln[6:] for ln in out.stdout.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"


def test_langchain_chat_openai(server):
    import langchain_openai as lc
    llm = lc.ChatOpenAI(base_url=server.base_url, api_key="sk-test", model="gpt-3.5-turbo", max_tokens=8,
                        temperature=0)
    assert llm.invoke("Say hi").content
    assert "".join(chunk.content for chunk in llm.stream("Say hi"))
    emb = lc.OpenAIEmbeddings(base_url=server.base_url, api_key="sk-test", model="all-MiniLM-L6-v2",
                              check_embedding_ctx_length=False)
    assert len(emb.embed_query("hello")) == 384
