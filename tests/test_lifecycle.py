"""Process lifecycle: SIGTERM drains open streams and exits 0; a model that cannot load exits non-zero, in one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.support import REPO, running_server


@pytest.mark.slow
def test_sigterm_drains_an_open_stream_then_exits_0():
    with running_server({"DTYPE": "float32", "EMBEDDING_PATH": "none"}, name="lifecycle") as srv:
        body = {"messages": [{"role": "user", "content": "Count from 1 to 100, one number per line."}],
                "max_tokens": 48, "temperature": 0, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", srv.base_url + "/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for line in lines:  # wait for the first content chunk: the stream is really open
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    events.append(line)
                    break
            srv.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            refused = threading.Event()

            def knock():  # new connections are refused while the old stream drains
                time.sleep(0.5)
                try:
                    httpx.get(srv.url + "/health", timeout=5)
                except httpx.TransportError:
                    refused.set()

            t = threading.Thread(target=knock)
            t.start()
            events += [line for line in lines if line.startswith("data: ")]
            t.join()
        assert events[-1] == "data: [DONE]", events[-3:]
        last = json.loads(events[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] == "length"  # all 48 tokens came, nothing was cut
        assert refused.is_set()
        assert srv.proc.wait(60) == 0
        assert time.monotonic() - sent < 60
        assert "Cancel" not in srv.log_tail()  # uvicorn's drain timeout did not have to cancel anything


def test_model_that_cannot_load_exits_nonzero_with_a_one_line_reason():
    env_args = ["--model-path", "/nonexistent/model", "--embedding-path", "none", "--port", "0"]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "server", *env_args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**_env(), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("glm-serve: could not load the model:") and "/nonexistent/model" in last, proc.stderr
    assert time.monotonic() - started < 300


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "API_KEYS", "API_KEYS_FILE")}


def test_health_while_loading_and_after_a_failed_load_is_an_openai_error_without_the_reason():
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import Settings

    failed = threading.Event()
    app = create_app(Settings(model_path="/nonexistent/secret-dir/model", embedding_path="none"),
                     on_load_failure=lambda reason: failed.set())
    with TestClient(app) as client:
        seen = [client.get("/health")]
        assert failed.wait(120)  # set after the status turns "failed"
        seen.append(client.get("/health"))
    assert seen[-1].json()["status"] == "failed"
    for r in seen:
        body = r.json()
        assert r.status_code == 503 and r.headers["retry-after"]
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] in ("model_loading", "model_load_failed")
        assert "secret-dir" not in r.text
