"""API keys, ZhipuAI JWTs, what stays open, CORS, and refusing to start with an unreadable key file."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import httpx
import jwt
import openai
import pytest
from starlette.testclient import TestClient

from server.api.auth import KeyRing, bearer_token
from tests.hardened import AUTH, KEY, ORIGIN, ZHIPU_ID, ZHIPU_KEY, ZHIPU_SECRET, stub_app
from tests.support import REPO

pytest_plugins = ["tests.hardened_server"]

REJECTED = {"error": {"message": "Incorrect API key provided. Send a key of this server as "
                      "'Authorization: Bearer <key>'.", "type": "authentication_error", "param": None,
                      "code": "invalid_api_key"}}


def zhipu_jwt(key_id=ZHIPU_ID, secret=ZHIPU_SECRET, exp_ms=None, **kw) -> str:
    now = int(time.time() * 1000)
    payload = {"api_key": key_id, "exp": now + 210_000 if exp_ms is None else exp_ms, "timestamp": now}
    return jwt.encode(payload, secret, algorithm=kw.pop("alg", "HS256"), headers={"sign_type": "SIGN"}, **kw)


@pytest.fixture(scope="module")
def ring():
    return KeyRing([KEY, ZHIPU_KEY, "a.b.c"])


# ---- KeyRing ------------------------------------------------------------------------------------------------


def test_plain_keys(ring):
    assert ring.enabled and not KeyRing([]).enabled
    assert ring.accepts(KEY) and ring.accepts(ZHIPU_KEY)
    assert ring.accepts("a.b.c")  # a plain key shaped like a JWT still matches as a plain key
    for wrong in ("", KEY[:-1], KEY + "x", KEY.upper(), " " + KEY, ZHIPU_ID, ZHIPU_SECRET, "x" * 10_000):
        assert not ring.accepts(wrong), wrong


def test_non_ascii_tokens_are_rejected_not_errors(ring):
    # compare_digest on str raises TypeError for non-ASCII; headers are latin-1 decoded, so this must be handled.
    assert not ring.accepts("ключ-ü-\x80\xff")
    assert not ring.accepts("\udcff")


def test_the_zhipuai_sdks_own_jwt_is_accepted(ring):
    from zhipuai.core._jwt_token import generate_token

    assert ring.accepts(generate_token(ZHIPU_KEY))
    assert ring.accepts(zhipu_jwt())
    assert ring.accepts(zhipu_jwt(exp_ms=(time.time() + 5) * 1000))  # a float exp is still milliseconds


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(zhipu_jwt(exp_ms=int(time.time() * 1000) - 1), id="expired"),
        pytest.param(zhipu_jwt(exp_ms=int(time.time()) + 3600), id="exp-in-seconds-is-long-past"),
        pytest.param(zhipu_jwt(secret="not-the-secret-0123456789"), id="forged-signature"),
        pytest.param(zhipu_jwt(key_id="stranger", secret="stranger-secret-0123"), id="unknown-id"),
        pytest.param(zhipu_jwt(key_id="sk-glm-serve-test", secret=KEY), id="openai-key-is-no-zhipu-secret"),
        pytest.param(zhipu_jwt(alg="HS512"), id="other-algorithm"),
        pytest.param(jwt.encode({"api_key": ZHIPU_ID, "exp": 2**62}, None, algorithm="none"), id="alg-none"),
        pytest.param(jwt.encode({"api_key": ZHIPU_ID}, ZHIPU_SECRET, algorithm="HS256"), id="no-exp"),
        pytest.param(jwt.encode({"api_key": ZHIPU_ID, "exp": "9999999999999"}, ZHIPU_SECRET, algorithm="HS256"),
                     id="exp-not-a-number"),
        pytest.param(jwt.encode({"api_key": [ZHIPU_ID], "exp": 2**62}, ZHIPU_SECRET, algorithm="HS256"),
                     id="id-not-a-string"),
        pytest.param("e30.e30.", id="empty-parts"),
        pytest.param("%%%.###.$$$", id="garbage"),
    ],
)
def test_bad_jwts_are_rejected(ring, token):
    assert not ring.accepts(token)


def test_bearer_token_forms():
    h = lambda **kv: {k.encode(): v.encode("latin-1") for k, v in kv.items()}  # noqa: E731
    assert bearer_token(h(authorization="Bearer abc")) == "abc"
    assert bearer_token(h(authorization="bearer   abc ")) == "abc"
    assert bearer_token(h(authorization="eyJ.x.y")) == "eyJ.x.y"  # zhipuai v1 SDKs send the bare JWT
    assert bearer_token(h(**{"x-api-key": "abc"})) == "abc"
    assert bearer_token(h(authorization="Basic dXNlcjpwYXNz")) == ""  # not a scheme we take keys from
    assert bearer_token({}) == ""


# ---- the middleware, in process -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    with TestClient(stub_app(api_keys=f"{KEY},{ZHIPU_KEY}")) as c:
        yield c


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/stub", "/v1/no/such/route", "/metrics",
                                  "/openapi.json", "/docs", "/v1/chat/completions"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer" + KEY},
                                     {"x-api-key": "wrong"}, {"Authorization": f"Bearer {zhipu_jwt(secret='x' * 20)}"}],
                         ids=["none", "wrong", "no-space-after-bearer", "x-api-key-wrong", "forged-jwt"])
def test_everything_but_health_needs_a_key_and_every_rejection_is_the_same(client, path, headers):
    r = client.post(path, json={}, headers=headers) if path.endswith("completions") else client.get(path,
                                                                                                  headers=headers)
    assert r.status_code == 401
    assert r.json() == REJECTED
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["x-request-id"]


def test_valid_keys_open_the_api(client):
    for headers in (AUTH, {"x-api-key": KEY}, {"Authorization": KEY}, {"Authorization": f"Bearer {ZHIPU_KEY}"},
                    {"Authorization": f"Bearer {zhipu_jwt()}"}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 200, headers
        assert r.json()["data"][0]["id"] == "stub"
    assert client.get("/metrics", headers=AUTH).status_code == 200
    assert client.get("/v1/no/such/route", headers=AUTH).status_code == 404  # routes only show past the key


def test_health_stays_open(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_no_keys_means_no_auth():
    with TestClient(stub_app()) as c:
        assert c.get("/v1/models").status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_key_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# team keys\n\n  {KEY}  \n#{ZHIPU_KEY}\n")
    with TestClient(stub_app(api_keys_file=str(f))) as c:
        assert c.get("/v1/models", headers=AUTH).status_code == 200
        commented = {"Authorization": f"Bearer {ZHIPU_KEY}"}
        assert c.get("/v1/models", headers=commented).status_code == 401


# ---- CORS ---------------------------------------------------------------------------------------------------


def preflight(c, origin):
    return c.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_preflight_allowed_and_disallowed_origin():
    with TestClient(stub_app(api_keys=KEY, cors_origins=f"{ORIGIN},https://other.example")) as c:
        ok = preflight(c, ORIGIN)
        assert ok.status_code == 200  # preflights carry no key and must not need one
        assert ok.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        bad = preflight(c, "https://evil.example")
        assert bad.status_code == 400
        assert "access-control-allow-origin" not in bad.headers
        # A rejected call from an allowed page still carries CORS headers, so the page can show the error.
        r = c.get("/v1/models", headers={"Origin": ORIGIN})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        r = c.get("/v1/models", headers={"Origin": "https://evil.example", **AUTH})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("origins", ["*", f"{ORIGIN},*"])
def test_cors_wildcard_never_with_credentials(origins):
    with TestClient(stub_app(cors_origins=origins)) as c:
        r = c.get("/v1/models", headers={"Origin": "https://evil.example", "Cookie": "session=1"})
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers
        assert "access-control-allow-credentials" not in preflight(c, "https://evil.example").headers


def test_no_cors_origins_no_cors_headers():
    with TestClient(stub_app()) as c:
        assert "access-control-allow-origin" not in c.get("/v1/models", headers={"Origin": ORIGIN}).headers


# ---- startup ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [None, "# only a comment\n\n"], ids=["missing", "empty"])
def test_unusable_key_file_refuses_to_start(tmp_path, content):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "server", "--api-keys-file", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glm-serve: invalid settings: API_KEYS_FILE"), proc.stderr


@pytest.mark.parametrize(("host", "keys", "warns"), [("0.0.0.0", "", True), ("::", "", True),
                                                     ("0.0.0.0", KEY, False), ("127.0.0.1", "", False),
                                                     ("::1", "", False), ("localhost", "", False)])
def test_open_bind_without_keys_warns(monkeypatch, caplog, host, keys, warns):
    import uvicorn
    from sse_starlette.sse import AppStatus

    from server.__main__ import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)  # nothing is bound: we only read the log
    # main() sets process-wide signal handlers and sse-starlette's drain mode: keep pytest's own.
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    monkeypatch.setattr(AppStatus, "enable_automatic_graceful_drain", AppStatus.enable_automatic_graceful_drain)
    args = ["--host", host, "--port", "1", "--embedding-path", "none"] + (["--api-keys", keys] if keys else [])
    with caplog.at_level(logging.WARNING, logger="glm_serve"):
        main(args)
    assert any("WITHOUT API keys" in r.getMessage() for r in caplog.records) == warns


# ---- the real server and the real SDKs ----------------------------------------------------------------------


def test_openai_sdk_with_and_without_the_key(hardened_server):
    good = openai.OpenAI(base_url=hardened_server.base_url, api_key=KEY, max_retries=0, timeout=120)
    r = good.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                     max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None
    assert good.embeddings.create(model="all-MiniLM-L6-v2", input="hi").data[0].embedding
    bad = openai.OpenAI(base_url=hardened_server.base_url, api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


@pytest.mark.parametrize("disable_token_cache", [False, True], ids=["jwt", "plain-id.secret"])
def test_zhipuai_sdk_both_auth_modes(hardened_server, disable_token_cache):
    from zhipuai import ZhipuAI
    from zhipuai.core._errors import APIAuthenticationError

    client = ZhipuAI(api_key=ZHIPU_KEY, base_url=hardened_server.base_url + "/", max_retries=0,
                     disable_token_cache=disable_token_cache)
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, do_sample=False)
    assert r.choices[0].message.content is not None
    forged = ZhipuAI(api_key=f"{ZHIPU_ID}.wrong-secret-0123456", base_url=hardened_server.base_url + "/",
                     max_retries=0, disable_token_cache=disable_token_cache)
    with pytest.raises(APIAuthenticationError):
        forged.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4)


def test_real_server_open_and_closed_paths(hardened_server):
    assert httpx.get(hardened_server.url + "/health").status_code == 200
    for path in ("/metrics", "/v1/models", "/openapi.json"):
        r = httpx.get(hardened_server.url + path)
        assert r.status_code == 401 and r.json() == REJECTED, path
    assert httpx.get(hardened_server.url + "/metrics", headers=AUTH).status_code == 200


def test_example_keys_refuse_an_open_bind(monkeypatch):
    import uvicorn

    from server.__main__ import main

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: pytest.fail("must not serve"))
    with pytest.raises(SystemExit) as exit_:
        main(["--host", "0.0.0.0", "--api-keys", "sk-glm-serve-change-me,glm-serve.change-me"])
    assert "example key" in str(exit_.value.code)
