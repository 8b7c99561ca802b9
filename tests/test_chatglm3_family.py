"""ChatGLM3Family: the ModelFamily seams the engine uses (prompt ids, eos ids, decode of growing id slices)."""

import json
from pathlib import Path

import pytest

from server.families.chatglm3 import ChatGLM3Family
from server.families.chatglm3.tools import render_tool_call
from server.types import ChatRequest, SamplingParams, TextDelta, ToolCallDelta

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared/fixtures/chatglm3"

TEXTS = [
    "你好👋！我是人工智能助手 ChatGLM3-6B，很高兴见到你。",
    "😀🎉🚀 emoji — café naïve Ωμέγα 日本語テキスト 한국어 \U0001f9ec\U0001faa4",
    "def f(x):\n    return x ** 2\n\n\t缩进  两个空格",
]


@pytest.fixture(scope="module")
def family():
    return ChatGLM3Family.from_pretrained(FIXTURES)


def answer_ids(family, metadata, content):
    """The ids ChatGLM3 generates for one assistant message: encode(metadata + "\\n") + encode(content)."""
    return family.tokenizer.sp_encode(f"{metadata}\n") + family.tokenizer.sp_encode(content)


def stream_fixed_start(decode, ids):
    """decode(ids[:k]) for growing k, emitting the new end unless it ends in an incomplete character."""
    sent = ""
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        if not text.endswith("\ufffd"):
            yield text[len(sent) :]
            sent = text


def stream_moving_start(decode, ids):
    """decode(ids[start:k]), start moving past what is already sent (the cheap scheme for long answers)."""
    start = 0
    for k in range(1, len(ids) + 1):
        text = decode(ids[start:k])
        if not text.endswith("\ufffd"):
            yield text
            start = k


def stream_engine(decode, ids):
    """The engine's own detokenizer (a small window of context ids before the new ones)."""
    from server.serving.decode import IncrementalDetokenizer

    detokenizer = IncrementalDetokenizer(decode)
    yield from (detokenizer.push(i) for i in ids)
    yield detokenizer.flush()


@pytest.mark.parametrize("scheme", [stream_fixed_start, stream_moving_start, stream_engine])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_is_exact(family, scheme, text):
    tk = family.tokenizer
    ids = answer_ids(family, "", text) + [tk.assistant_token_id] + answer_ids(family, "", text)
    assert any(tk.sp.is_byte(i) for i in ids) or "😀" not in text  # byte-fallback pieces are exercised
    pieces = list(scheme(family.decode, ids))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == family.decode(ids) == f" \n {text}<|assistant|> \n {text}"


def test_decode_hides_special_tokens(family):
    tk = family.tokenizer
    ids = [tk.gmask_token_id, tk.sop_token_id, tk.user_token_id, *tk.sp_encode("hi"), 2, 0, 1, 64900, tk.eop_token_id]
    assert family.decode(ids) == " hi"


def test_eos_ids(family):
    assert family.eos_token_ids == {2, 64795, 64797}
    assert family.name == "chatglm3"


def parse(prompt, family, ids, reason="stop"):
    """What the engine does: decode the generated ids, feed the parser, finish."""
    events = prompt.parser.feed(family.decode(ids))
    tail, reason = prompt.parser.finish(reason)
    return events + tail, reason


def test_generated_ids_end_to_end(family):
    chat = ChatRequest(messages=[{"role": "user", "content": "你好"}], sampling=SamplingParams())
    prompt = family.build_prompt(chat)
    assert prompt.token_ids == [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
    events, reason = parse(prompt, family, answer_ids(family, "", "你好👋！有什么可以帮你？"))
    assert (events, reason) == ([TextDelta("你好👋！有什么可以帮你？")], "stop")


def test_generated_tool_call_end_to_end(family):
    cases = json.loads((FIXTURES / "tokenizer_cases.json").read_text())["chat_cases"]
    tools = next(c for c in cases if c["name"] == "system_with_tools_zh_cli_demo")["history"][0]["tools"]
    chat = ChatRequest(
        messages=[{"role": "user", "content": "帮我查询股票10111的价格"}],
        sampling=SamplingParams(),
        tools=[{"type": "function", "function": t} for t in tools],
    )
    prompt = family.build_prompt(chat)
    tk = family.tokenizer
    ids = answer_ids(family, "", "好的。") + [tk.assistant_token_id]
    ids += answer_ids(family, "track", render_tool_call("track", {"symbol": "10111", "备注": ["实时", 1.5]}))
    events, reason = parse(prompt, family, ids)
    assert reason == "tool_calls"
    assert events[0] == TextDelta("好的。")
    assert isinstance(events[1], ToolCallDelta) and events[1].name == "track" and events[1].id.startswith("call_")
    assert json.loads(events[2].arguments) == {"symbol": "10111", "备注": ["实时", 1.5]}
    assert "备注" in events[2].arguments  # ensure_ascii=False
