"""A second real server with keys on and the smallest capacity, for the 401 and 429 a person sees in a client.

Used by the web page and terminal client tests: the errors they display come from the real server, not a stand-in.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager

import httpx

from tests.support import running_server

MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-client-test-0123456789"
REJECTED = "Incorrect API key provided. Send a key of this server as 'Authorization: Bearer <key>'."
FULL = "The server is at capacity (1 running, 1 waiting). Retry shortly or raise MAX_WAITING_REQUESTS."
# Greedy, this model goes round in circles (no end of text for hundreds of tokens): it holds its slot until closed.
LONG = {"messages": [{"role": "user", "content": "Write a very long story about a dragon who learns to cook."}],
        "max_tokens": 4000, "temperature": 0, "stream": True}


@contextmanager
def keyed_server(name: str, **env: str):
    base = {"DTYPE": "float32", "API_KEYS": KEY, "MAX_RUNNING_REQUESTS": "1", "MAX_WAITING_REQUESTS": "1",
            "EMBEDDING_PATH": "none", "LOG_LEVEL": "info"}
    with running_server({**base, **env}, name=name) as srv:
        yield srv


def slots(server) -> tuple[float, float]:
    """(running, waiting) as the server reports them; /metrics needs the key too."""
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    return tuple(float(re.search(rf"^glm_serve_{name}_requests (\S+)", text, re.M).group(1))
                 for name in ("running", "waiting"))


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextmanager
def server_full(server):
    """Both slots of `server` (1 running, 1 waiting) held by real streaming requests until the block ends."""
    client = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    held = []
    try:
        for _ in range(2):
            held.append(client.send(client.build_request("POST", "/chat/completions", json=LONG), stream=True))
            assert held[-1].status_code == 200, held[-1].read()
        wait_for(lambda: slots(server) == (1, 1), "the server to report both slots taken")
        yield
    finally:
        for r in held:
            r.close()  # drops the connection: the server cancels the request and frees its slot
        client.close()
        wait_for(lambda: slots(server) == (0, 0), "the held requests to be cancelled")
