"""What a new user sees: starting the server and its first requests print no warning they cannot act on.

The servers run in subprocesses, so pytest's warning filters do not reach them: their logs are read instead.
A deprecated call of ours (e.g. `past_key_values` instead of `cache`, removed in transformers 5.40) shows up
here before the release that removes it breaks every user.
"""

from __future__ import annotations

import re

import httpx
import openai

from tests.support import CHATGLM3_FIXTURES, running_server

WARNING = re.compile(r"\b\w*Warning\b|\bdeprecat", re.IGNORECASE)


def _first_requests(srv, model: str, embeddings: bool) -> None:
    client = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=300)
    msgs = [{"role": "user", "content": "Hello"}]
    client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0)
    list(client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0.7, seed=1,
                                        stream=True))
    if embeddings:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=["hello"])
    assert httpx.get(srv.url + "/metrics", timeout=30).status_code == 200


def _warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if WARNING.search(line)]


def test_embedded_default_starts_and_answers_without_warnings():
    with running_server({"LOG_LEVEL": "info"}, name="warnings-embedded") as srv:  # the user's defaults
        _first_requests(srv, "SmolLM2-135M-Instruct", embeddings=True)
        log = srv.log_path.read_text(errors="replace")
    assert not _warnings(log), "\n".join(_warnings(log))


def test_chatglm3_starts_and_answers_without_warnings():
    env = {"MODEL_PATH": str(CHATGLM3_FIXTURES / "tiny-chatglm3"), "EMBEDDING_PATH": "none",
           "SERVED_MODEL_NAME": "chatglm3-6b"}
    with running_server(env, name="warnings-chatglm3") as srv:
        _first_requests(srv, "chatglm3-6b", embeddings=False)
        log = srv.log_path.read_text(errors="replace")
    assert not _warnings(log), "\n".join(_warnings(log))
