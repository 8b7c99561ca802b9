"""Fuzzing: schemathesis against the real server's own OpenAPI schema, and hypothesis on the parsers.

Bounded for a two-core box (derandomized, so a CI run is reproducible). For a deeper local run, make every test
here try more examples, without pytest's per-test timeout:  FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py --timeout=0
"""

from __future__ import annotations

import base64
import json
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response
from schemathesis import GenerationMode

from server.families.chatglm3.tools import ChatGLM3OutputParser, parse_tool_call, render_tool_call
from server.serving.decode import IncrementalDetokenizer, StopStrings
from tests.hardened import stub_app
from tests.sse import chat_stream_payloads, responses_stream_events
from tests.support import CHATGLM3_FIXTURES, running_server

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
# Small generations keep the fuzzed server fast: MAX_MODEL_LEN caps prompt + completion, and requests that
# would generate more than a few tokens are capped in `_small_generation`.
FUZZ_ENV = {"DTYPE": "float32", "MAX_MODEL_LEN": "512", "MAX_REQUEST_BYTES": "262144"}


def fuzz_settings(default: int, shrink: bool = True):
    # Shrinking a failure found against a live server can take many minutes; there, the first example is enough.
    phases = list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(max_examples=EXAMPLES or default, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), phases=phases)


def assert_openai_error(body: bytes, status: int) -> None:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)


# ---- schemathesis against the running server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz") / "responses.sqlite3"
    with running_server({**FUZZ_ENV, "RESPONSES_STORE": str(store)}, name="fuzz") as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


# The operations, known without a server (the routes are static). Driven through `as_strategy` rather than
# `schemathesis.pytest.from_fixture`, which breaks on pytest 9 (it writes Function._nodeid).
# Negative cases only where there is a body to get wrong: the GET routes have nothing to invalidate.
OPERATIONS = [(method.upper(), path, mode) for path, ops in stub_app().openapi()["paths"].items()
              for method, op in ops.items()
              for mode in ([GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if "requestBody" in op
                           else [GenerationMode.POSITIVE])]


def _small_generation(case) -> None:
    """At most 8 new tokens per choice; values the server must refuse anyway are left for it to refuse."""
    body = case.body
    fields = {"/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
              "/v1/responses": ("max_output_tokens",)}.get(case.path)
    if fields is None or not isinstance(body, dict):
        return
    for field in fields:
        value = body.get(field)
        if type(value) is int and value > 8:
            body[field] = 8 if value <= 512 else value  # > 512 is over the context: a 400 to check
    if all(body.get(field) is None for field in fields):
        body[fields[0]] = 8


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS, ids=[f"{m} {p} {g.value}" for m, p, g in OPERATIONS])
@fuzz_settings(15, shrink=False)
@given(data=st.data())
def test_openapi_fuzz_no_5xx_and_openai_errors(api_schema, fuzz_server, method, path, mode, data):
    case = data.draw(api_schema[path][method].as_strategy(mode), label="case")
    _small_generation(case)
    response = case.call(timeout=120)
    where = f"{case.method} {case.path} body={case.body!r:.300}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.content[:300]!r}\n" \
                                       f"{fuzz_server.log_tail(20)}"
    if response.status_code >= 400:
        assert_openai_error(response.content, response.status_code)
        return
    content_type = (response.headers.get("content-type") or [""])[0]
    if content_type.startswith("text/event-stream") and case.path == "/v1/responses":
        if not response.stream_cut_short:
            events = responses_stream_events(response.content)
            assert [e["sequence_number"] for e in events] == list(range(len(events)))
            for event in events:
                if "response" in event:
                    Response.model_validate(event["response"])
    elif content_type.startswith("text/event-stream"):
        if not response.stream_cut_short:
            for payload in chat_stream_payloads(response.content):
                if "error" in payload:
                    assert_openai_error(json.dumps(payload).encode(), 0)
                else:
                    ChatCompletionChunk.model_validate(payload)
    elif case.path == "/v1/chat/completions":
        ChatCompletion.model_validate(json.loads(response.content))
    elif case.path == "/v1/responses" or (case.path.startswith("/v1/responses/") and case.method == "GET"):
        Response.model_validate(json.loads(response.content))
    elif case.path == "/v1/embeddings":
        reply = json.loads(response.content)
        if isinstance(case.body, dict) and case.body.get("encoding_format") == "base64":
            for item in reply["data"]:  # the SDK's type expects float lists; base64 must be whole float32s
                assert len(base64.b64decode(item.pop("embedding"), validate=True)) % 4 == 0
                item["embedding"] = []
        CreateEmbeddingResponse.model_validate(reply)


# ---- SSE framing under arbitrary requests -------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=60) | st.sampled_from(
    ["data: [DONE]\n\n", "\r\n\r\n", "event: x\nid: 1\n\n", "你好，世界 👋🏽", "\ufffd", '"}]}']
)


@pytest.mark.slow
@fuzz_settings(8, shrink=False)
@given(content=TEXT, stops=st.lists(TEXT.filter(bool), max_size=3), n=st.integers(1, 2),
       max_tokens=st.integers(1, 8), usage=st.booleans())
def test_stream_framing_is_strict_sse_and_matches_non_stream(fuzz_server, content, stops, n, max_tokens, usage):
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": max_tokens,
            "n": n, "stop": stops or None}
    plain = httpx.post(fuzz_server.base_url + "/chat/completions", json=body, timeout=120)
    assert plain.status_code == 200, plain.text
    raw = httpx.post(fuzz_server.base_url + "/chat/completions", timeout=120,
                     json={**body, "stream": True, "stream_options": {"include_usage": usage}})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    chunks = [ChatCompletionChunk.model_validate(p) for p in chat_stream_payloads(raw.content)]
    assert len({c.id for c in chunks}) == 1
    texts, reasons = [""] * n, [[] for _ in range(n)]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index].append(choice.finish_reason)
    expected = plain.json()["choices"]
    for i in range(n):
        assert texts[i] == expected[i]["message"]["content"]
        assert reasons[i] == [expected[i]["finish_reason"]]
        assert not any(s in texts[i] for s in stops)
    has_usage = [c for c in chunks if c.usage is not None]
    assert len(has_usage) == (1 if usage else 0)
    if usage:
        assert has_usage[0] is chunks[-1] and not chunks[-1].choices
        assert has_usage[0].usage.model_dump(exclude_none=True) == plain.json()["usage"]


# ---- StopStrings -----------------------------------------------------------------------------------------------

SMALL = st.text("abc", max_size=40)  # a tiny alphabet makes stop strings actually occur


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


def run_stops(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    s, out = StopStrings(stops), []
    for piece in pieces:
        text, hit = s.push(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + s.flush(), False


@fuzz_settings(400)
@given(text=SMALL, stops=st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=12))
def test_stop_strings_cut_at_a_stop_whatever_the_chunking(text, stops, cuts):
    out, hit = run_stops(stops, chunked(text, cuts))
    assert not any(s in out for s in stops)
    assert text.startswith(out)
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    if first is None:
        assert (out, hit) == (text, False)
        return
    assert hit and any(text[len(out):].startswith(s) for s in stops)  # cut exactly where a stop begins
    # The text up to the first stop to *complete* is all the stream could have seen: the cut is in it.
    first_end = min(text.find(s) + len(s) for s in stops if s in text)
    assert len(out) < first_end
    if not any(a != b and a in b for a in stops for b in stops):
        assert out == text[:first]  # no stop inside another: the cut is the first stop, for any chunking


@fuzz_settings(200)
@given(text=st.text(max_size=80), stops=st.lists(st.text(min_size=1, max_size=6), max_size=4),
       cuts=st.lists(st.integers(0, 80), max_size=10))
def test_stop_strings_on_arbitrary_unicode(text, stops, cuts):
    out, hit = run_stops(stops, chunked(text, cuts))
    assert text.startswith(out) and not any(s in out for s in stops)
    assert hit == any(s in text for s in stops)


# ---- IncrementalDetokenizer with real tokenizers ---------------------------------------------------------------


def _chatglm3_decode():
    from server.families.chatglm3 import ChatGLM3Family, ChatGLM3Tokenizer

    family = ChatGLM3Family(ChatGLM3Tokenizer(CHATGLM3_FIXTURES / "tokenizer.model"))
    return lambda text: family.tokenizer.encode(text, add_special_tokens=False), family.decode


def _smollm2_decode():
    from server.families.chat_template import ChatTemplateFamily
    from tests.tiny_models import smollm2_tokenizer

    tok = smollm2_tokenizer()  # the server's converted copy, or read from the GGUF file itself
    family = ChatTemplateFamily(tok, [])
    return lambda text: tok.encode(text, add_special_tokens=False), family.decode


@pytest.fixture(scope="module", params=["chatglm3", "smollm2"])
def tokenizer(request):
    return {"chatglm3": _chatglm3_decode, "smollm2": _smollm2_decode}[request.param]()


UNICODE = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40) | st.sampled_from(
    ["你好，世界", "👋🏽👨‍👩‍👧", "naïve café", "  leading and trailing  ", "\n\n\tx", "ｆｕｌｌ　ｗｉｄｔｈ"])


@fuzz_settings(150)
@given(text=UNICODE)
def test_incremental_detokenizer_adds_up_to_the_full_decode(tokenizer, text):
    encode, decode = tokenizer
    ids = encode(text)
    assume(ids)
    detok = IncrementalDetokenizer(decode)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == decode(ids)
    assert all(not d.endswith("\ufffd") for d in deltas[:-1] if "\ufffd" not in decode(ids))


# ---- the ChatGLM3 tool-call parser ------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)


@fuzz_settings(150)
@given(name=NAMES, arguments=st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=5))
def test_rendered_tool_calls_parse_back(name, arguments):
    assert parse_tool_call(render_tool_call(name, arguments), name) == json.loads(json.dumps(arguments))


@pytest.mark.parametrize("key", ["µ", "ﬁle", "ｘ"])
def test_rendered_tool_call_keeps_keys_python_would_normalize(key):
    assert parse_tool_call(render_tool_call("f", {key: 1}), "f") == {key: 1}


# Fragments of python, including what a prompt-injected model might try, glued in any order.
CODEISH = st.lists(st.sampled_from(
    ["tool_call(", "x=", "1", "'a'", ",", ")", "[", "]", "{", "}", ":", "**", "(", "os.system('id')",
     "__import__('os')", "lambda: 0", "true", "null", "1e999", "-", "0x1", "b'x'", "{1,2}", "1j", "...", " ",
     "```python\n", "\n```", "f'{x}'", "[i for i in x]", "a.b", "x()", "\\", "'" * 3, "#"]),
    max_size=30).map("".join)


@fuzz_settings(600)
@given(text=CODEISH | st.text(max_size=200), name=st.none() | NAMES)
def test_parse_tool_call_never_raises_and_returns_json(text, name):
    for candidate in (text, f"```python\n{text}\n```"):
        result = parse_tool_call(candidate, name)
        assert result is None or (isinstance(result, dict) and json.loads(json.dumps(result)) == result)


def test_parse_tool_call_survives_deep_nesting():
    # Model output is attacker-influenced (prompt injection) and up to the context long: no RecursionError,
    # MemoryError or parser crash may escape.
    for depth in (100, 1_000, 100_000):
        for value in ("[" * depth + "]" * depth, "(" * depth + ")" * depth, "-" * depth + "1",
                      "{1:" * depth + "1" + "}" * depth, "not " * depth + "1"):
            result = parse_tool_call(f"tool_call(x={value})")
            assert result is None or isinstance(result, dict)


def parse_stream(text: str, cuts: list[int], tools=("get_weather", "track"), reason="stop"):
    parser, events = ChatGLM3OutputParser(tools), []
    for piece in chunked(text, cuts):
        events += parser.feed(piece)
    tail, reason = parser.finish(reason)
    events += tail
    content = "".join(getattr(e, "text", "") for e in events)
    calls = [(e.name, e.arguments) for e in events if hasattr(e, "index")]
    return content, calls, reason


GLM_OUTPUT = st.lists(st.sampled_from(
    ["get_weather\n", "track\n", "interpreter\n", "unknown_tool\n", "```python\n", "tool_call(city='北京')",
     "tool_call(x=1, **{'a b': [1, 2]})", "\n```", "<|assistant|>", "<|assist", "Hello", " ", "\n", "你好",
     "os.system('id')", "tool_call(", ")"]) | st.text(max_size=10), max_size=12).map("".join)


@fuzz_settings(400)
@given(text=GLM_OUTPUT, cuts=st.lists(st.integers(0, 200), max_size=10),
       reason=st.sampled_from(["stop", "length", "abort"]))
def test_chatglm3_output_parser_is_chunking_invariant(text, cuts, reason):
    whole = parse_stream(text, [], reason=reason)
    assert parse_stream(text, cuts, reason=reason) == whole
    content, calls, final = whole
    assert final in ("stop", "length", "abort", "tool_calls")
    for _, arguments in calls:
        if arguments:
            assert isinstance(json.loads(arguments), dict)


# ---- found by the fuzzer: a sampling error (NaN scores) once lost its request and leaked its slot ---------------


def test_a_request_whose_sampling_fails_gets_an_error_and_frees_its_slot():
    import threading
    from types import SimpleNamespace

    import torch

    from server.backends.native.scheduler import Scheduler, Sequence
    from server.errors import EngineOverloaded
    from server.types import SamplingParams

    vocab = 16

    def nan_model(input_ids, **_):  # what logits / 5e-324 (repetition_penalty) or / 1e-40 (temperature) became
        return SimpleNamespace(logits=torch.full((1, input_ids.shape[1], vocab), float("nan")))

    outputs, done = [], threading.Event()

    def publish(batch):
        outputs.extend(batch)
        done.set()

    scheduler = Scheduler(nan_model, device=torch.device("cpu"), vocab_size=vocab, publish=publish,
                          max_running=1, max_waiting=1)
    scheduler.start()
    try:
        for _ in range(3):  # more poisoned requests than there are slots
            done.clear()
            try:
                scheduler.submit(Sequence([1, 2], SamplingParams(temperature=1.0), 4, set(), sink=lambda out: None))
            except EngineOverloaded:
                pytest.fail("the slots of failed requests were never given back")
            assert done.wait(5), "the failed request got no output at all: its client would hang"
        assert all(out.finish_reason == "error" for _, out in outputs)
    finally:
        scheduler.stop()
