"""ChatGLM3 tool calls: safe parsing, the streaming parser, and OpenAI tool rounds rendered as THUDM's prompts."""

import copy
import json
import random
import uuid
from pathlib import Path

import pytest

from server.errors import EngineError
from server.families.chatglm3.tools import ChatGLM3OutputParser, parse_tool_call, render_tool_call
from server.types import ChatRequest, SamplingParams, TextDelta, ToolCallDelta

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared/fixtures/chatglm3"

WEATHER = {
    "name": "get_current_weather",
    "description": "Get the current weather in a given location",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string"},
        },
        "required": ["location"],
    },
}
TOOLS = ["get_current_weather", "track"]


def run(text, tools=TOOLS, forced=None, reason="stop", chunk=None):
    """Feed `text` whole or in chunks of `chunk` chars; return (merged text, tool calls, finish reason)."""
    parser = ChatGLM3OutputParser(tools, forced_tool=forced)
    events = []
    pieces = [text] if chunk is None else [text[i : i + chunk] for i in range(0, len(text), chunk)]
    for piece in pieces:
        events += parser.feed(piece)
    tail, reason = parser.finish(reason)
    events += tail
    assert all(isinstance(e, (TextDelta, ToolCallDelta)) for e in events)
    content = "".join(e.text for e in events if isinstance(e, TextDelta))
    calls = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            call = calls.setdefault(e.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or e.id
            call["name"] = call["name"] or e.name
            call["arguments"] += e.arguments
    return content, [calls[i] for i in sorted(calls)], reason


# ---- parse_tool_call ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("```python\ntool_call(location='北京', unit='celsius')\n```", {"location": "北京", "unit": "celsius"}),
        ('```python\ntool_call(location="beijing", unit="celsius")\n```', {"location": "beijing", "unit": "celsius"}),
        ("```python\ntool_call(symbol='10111')\n```", {"symbol": "10111"}),
        (
            "```python\ntool_call(q={'城市': ['上海', '杭州'], 'days': 3, 'hourly': False}, limit=-2.5e3, x=None)\n```",
            {"q": {"城市": ["上海", "杭州"], "days": 3, "hourly": False}, "limit": -2500.0, "x": None},
        ),
        ("tool_call(flag=True, pair=(1, 2))", {"flag": True, "pair": [1, 2]}),  # no fence; tuples become lists
        ("```\ntool_call(a=true, b=null)\n```", {"a": True, "b": None}),  # JSON spellings
        ("```python\ntool_call()\n```", {}),
    ],
)
def test_parse_realistic_calls(block, expected):
    assert parse_tool_call(block) == expected


MALICIOUS = [
    "tool_call(x=__import__('os').system('touch {marker}'))",
    "__import__('os').system('touch {marker}')",
    "tool_call(x=open('{marker}', 'w').write('x'))",
    "tool_call(**__import__('os').system('touch {marker}'))",
    "tool_call(x=[__import__('os').system('touch {marker}') for _ in '1'])",
    "tool_call(x=(lambda: __import__('os').system('touch {marker}'))())",
    "tool_call(x=f\"{{__import__('os').system('touch {marker}')}}\")",
    "tool_call(x=1)\n__import__('os').system('touch {marker}')",
    "tool_call(__import__('os').system('touch {marker}'))",
    "getattr(__builtins__, 'exec')(\"import os; os.system('touch {marker}')\")",
    "tool_call(x={{1, 2}})",  # a set: a literal, but not JSON
    "tool_call(x=1+2j)",
    "tool_call(x=b'bytes')",
    "tool_call(x=" + "[" * 5000 + "]" * 5000 + ")",  # deep nesting
]


@pytest.mark.parametrize("payload", MALICIOUS)
def test_malicious_calls_are_never_run(tmp_path, payload):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    code = payload.format(marker=marker)
    assert parse_tool_call(f"```python\n{code}\n```") is None
    content, calls, reason = run(f" get_current_weather\n ```python\n{code}\n```")
    assert (calls, reason) == ([], "stop")
    assert content == f"```python\n{code}\n```"
    assert not marker.exists()


@pytest.mark.parametrize(
    "block",
    ["```python\ntool_call(location='北京'\n```", "```python\ntool_call(1, 2)\n```", "```python\nprint('hi')\n```",
     "```python\n```", "tool_call(x=y)", "tool_call(**{1: 2})", "not python at all: 你好"],
)  # fmt: skip
def test_malformed_calls_give_none(block):
    assert parse_tool_call(block) is None


def random_json(rng, depth=0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(10**12), 10**12)
    if kind == 2:
        return rng.uniform(-1e6, 1e6)
    if kind in (3, 4):
        alphabet = "abc XYZ 北京天气 😀'\"\\\n\t{}[]()=,#"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["location", "城市", "from", "a-b", "class", "_x", "9z", "True"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_render_parse_round_trip():
    rng = random.Random(1234)
    for _ in range(300):
        arguments = random_json(rng, depth=1)
        arguments = arguments if isinstance(arguments, dict) else {"value": arguments}
        rendered = render_tool_call("f", arguments)
        assert rendered.startswith("```python\ntool_call(") and rendered.endswith(")\n```")
        parsed = parse_tool_call(rendered)
        assert parsed == arguments and list(parsed) == list(arguments)
        # And through the streaming parser, as the model would say it.
        _, calls, reason = run(f" f\n {rendered}", tools=["f"], chunk=7)
        assert reason == "tool_calls" and json.loads(calls[0]["arguments"]) == arguments


def test_render_layout_matches_the_finetune_format():
    assert render_tool_call("track", {"symbol": "10111"}) == "```python\ntool_call(symbol='10111')\n```"
    assert (
        render_tool_call("get_current_weather", {"location": "北京", "days": 3, "detail": True, "extra": None})
        == "```python\ntool_call(location='北京', days=3, detail=True, extra=None)\n```"
    )


# ---- the streaming parser -----------------------------------------------------------------------------------


def answer(text, content, calls=(), reason="stop", *, tools=TOOLS, forced=None, reason_in="stop"):
    """A model answer (as the family decodes it) and what the parser must make of it."""
    return pytest.param(text, tools, forced, reason_in, content, list(calls), reason, id=text[:30])


WEATHER_CALL = " get_current_weather\n ```python\ntool_call(location='北京')\n```"
ANSWERS = [
    answer(" \n 你好👋！我是人工智能助手 ChatGLM3-6B。\n\n", "你好👋！我是人工智能助手 ChatGLM3-6B。"),
    answer(" \n   ```python\n    x = 1\n```", "```python\n    x = 1\n```"),
    answer(WEATHER_CALL, "", [("get_current_weather", {"location": "北京"})], "tool_calls"),
    answer(
        " \n 好的，我来查一下。<|assistant|>get_current_weather\n ```python\ntool_call(location='上海')\n```",
        "好的，我来查一下。",
        [("get_current_weather", {"location": "上海"})],
        "tool_calls",
    ),
    answer(
        " track\n ```python\ntool_call(symbol='1')\n```<|assistant|>track\n ```python\ntool_call(symbol='2')\n```",
        "",
        [("track", {"symbol": "1"}), ("track", {"symbol": "2"})],
        "tool_calls",
    ),
    answer(
        " ```python\ntool_call(symbol='10111')\n```", "", [("track", {"symbol": "10111"})], "tool_calls", forced="track"
    ),
    # Cut off by max_tokens, mid-call or not: text, reason "length".
    answer(WEATHER_CALL[:-7], "```python\ntool_call(location='北", reason="length", reason_in="length"),
    answer(WEATHER_CALL, "```python\ntool_call(location='北京')\n```", reason="length", reason_in="length"),
    answer(" interpreter\n ```python\nimport os\nprint(1)\n```", "```python\nimport os\nprint(1)\n```"),
    answer(" unknown_tool\n ```python\ntool_call(a=1)\n```", "unknown_tool\n```python\ntool_call(a=1)\n```"),
    # tool_choice "none": no tool is known, so a call is just text.
    answer(WEATHER_CALL, "get_current_weather\n```python\ntool_call(location='北京')\n```", tools=[]),
    answer("Hello without metadata", "Hello without metadata"),
    answer(
        "A long answer without a metadata line, well past any tool name " * 3,
        ("A long answer without a metadata line, well past any tool name " * 3).strip(),
    ),
    answer(" \n a <| b <|assistant c", "a <| b <|assistant c"),
    answer("", ""),
    answer(" \n", "", reason="length", reason_in="length"),
]


@pytest.mark.parametrize(("text", "tools", "forced", "reason_in", "content", "calls", "reason_out"), ANSWERS)
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_streaming_parser(text, tools, forced, reason_in, content, calls, reason_out, chunk):
    got_content, got_calls, got_reason = run(text, tools, forced, reason_in, chunk)
    assert got_content == content
    assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == calls
    assert all(c["id"].startswith("call_") and len(c["id"]) > 10 for c in got_calls)
    assert got_reason == reason_out


def test_text_streams_before_the_answer_ends():
    parser = ChatGLM3OutputParser(TOOLS)
    assert parser.feed(" ") == []  # the metadata line is still open
    assert parser.feed("\n 你好") == [TextDelta("你好")]
    assert parser.feed("，世界  ") == [TextDelta("，世界")]  # trailing spaces held back...
    assert parser.feed("!") == [TextDelta("  !")]  # ...until more text follows
    assert parser.finish("stop") == ([], "stop")


def test_tool_call_ids_are_unique():
    ids = {run(" track\n ```python\ntool_call(symbol='1')\n```")[1][0]["id"] for _ in range(20)}
    assert len(ids) == 20


# ---- OpenAI tool rounds -> ChatGLM3 prompts -----------------------------------------------------------------


@pytest.fixture(scope="module")
def family():
    if not FIXTURES.is_dir():
        pytest.fail(f"no ChatGLM3 fixtures at {FIXTURES}")
    from server.families.chatglm3 import ChatGLM3Family

    return ChatGLM3Family.from_pretrained(FIXTURES)


def chat_case(name):
    cases = json.loads((FIXTURES / "tokenizer_cases.json").read_text())["chat_cases"]
    return next(c for c in cases if c["name"] == name)


def request(messages, tools=None, tool_choice=None):
    return ChatRequest(messages=messages, sampling=SamplingParams(), tools=tools, tool_choice=tool_choice)


def as_tools(*functions):
    return [{"type": "function", "function": f} for f in functions]


def weather_round(final_user=None):
    messages = [
        {"role": "user", "content": "What's the weather in Beijing today?"},
        {
            "role": "assistant",
            "content": "Okay, let's look up the weather in Bejing today.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_current_weather",
                        "arguments": '{"location": "beijing", "unit": "celsius"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
    ]
    if final_user:
        answer = "According to the query results, the temperature in Beijing today is 22 degrees Celsius."
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": final_user}]
    return messages


def expected_ids(family, case):
    """The case's ids with its tool call rendered our (finetune, single-quoted) way instead of its double quotes."""
    from server.families.chatglm3.prompt import build_chat_input

    history = copy.deepcopy(case["history"])
    for item in history:
        if item.get("metadata") == "get_current_weather":
            assert item["content"] == '```python\ntool_call(location="beijing", unit="celsius")\n```'
            item["content"] = "```python\ntool_call(location='beijing', unit='celsius')\n```"
    return build_chat_input(family.tokenizer, case["query"], history, case["role"])


@pytest.mark.parametrize(
    ("name", "messages"),
    [
        ("observation_after_tool_call", weather_round()),
        ("full_tool_round_then_user", weather_round("And in Shanghai?")),
    ],
)
def test_openai_tool_round_matches_the_fixture(family, name, messages):
    case = chat_case(name)
    ids = family.build_prompt(request(messages, as_tools(WEATHER))).token_ids
    assert ids == expected_ids(family, case)
    # The only difference from THUDM's own example is the quote style inside the tool call.
    quoted = case["decoded"].replace('"beijing"', "'beijing'").replace('"celsius"', "'celsius'")
    assert family.tokenizer.decode(ids) == quoted
    # Everything before the call's arguments is id for id the fixture's.
    call_start = case["expected_input_ids"].index(family.tokenizer.sp_encode("```python")[0], 150)
    assert ids[:call_start] == case["expected_input_ids"][:call_start]


def test_golden_tool_observation_case_ids(family):
    golden = json.loads((FIXTURES / "golden.json").read_text())["variants"]["tiny-chatglm3"]["cases"]
    case = next(c for c in golden if c["name"] == "tool_observation")
    messages = weather_round()
    del messages[1]["content"]  # golden case: the call without words before it
    ids = family.build_prompt(request(messages, as_tools(WEATHER))).token_ids
    assert ids == expected_ids(family, case)
    assert len(ids) == len(case["input_ids"]) and ids[:40] == case["input_ids"][:40]


@pytest.mark.parametrize("name", ["system_with_tools_en", "system_with_tools_zh_cli_demo"])
def test_openai_tools_system_turn_is_exact(family, name):
    case = chat_case(name)
    functions = case["history"][0]["tools"]
    messages = [{"role": "user", "content": case["query"]}]
    assert family.build_prompt(request(messages, as_tools(*functions))).token_ids == case["expected_input_ids"]
    # Legacy `functions` (flat function objects) give the same prompt.
    assert family.build_prompt(request(messages, functions)).token_ids == case["expected_input_ids"]


def test_client_system_prompt_is_kept_with_tools(family):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    ids = family.build_prompt(request(messages, as_tools(WEATHER))).token_ids
    assert family.tokenizer.decode(ids).startswith('[gMASK]sop<|system|> \n You are terse.\n[\n    {\n        "name"')


def test_tool_choice(family):
    tk = family.tokenizer
    messages = [{"role": "user", "content": "weather?"}]
    track = {"name": "track", "description": "stock price", "parameters": {"type": "object", "properties": {}}}
    auto = family.build_prompt(request(messages, as_tools(WEATHER, track), "auto")).token_ids
    assert auto == family.build_prompt(request(messages, as_tools(WEATHER, track))).token_ids
    assert auto[-1] == tk.assistant_token_id
    none = family.build_prompt(request(messages, as_tools(WEATHER), "none")).token_ids
    assert none == [64790, 64792, tk.user_token_id, *tk.sp_encode("\n"), *tk.sp_encode("weather?"), 64796]

    named = {"type": "function", "function": {"name": "track"}}
    prompt = family.build_prompt(request(messages, as_tools(WEATHER, track), named))
    assert prompt.token_ids == auto + tk.sp_encode("track\n")
    prompt.parser.feed(" ```python\ntool_call(symbol='1')\n```")
    events, reason = prompt.parser.finish("stop")
    assert reason == "tool_calls" and events[0].name == "track"

    one = family.build_prompt(request(messages, as_tools(WEATHER), "required")).token_ids
    assert one[-len(tk.sp_encode("get_current_weather\n")) :] == tk.sp_encode("get_current_weather\n")
    several = family.build_prompt(request(messages, as_tools(WEATHER, track), "required")).token_ids
    assert several == auto  # no way to force "one of several" without constrained decoding: the model picks
    legacy = family.build_prompt(request(messages, [track], {"name": "track"})).token_ids
    assert legacy[-len(tk.sp_encode("track\n")) :] == tk.sp_encode("track\n")

    for bad in ({"type": "function", "function": {"name": "nope"}}, "sometimes"):
        with pytest.raises(EngineError):
            family.build_prompt(request(messages, as_tools(WEATHER), bad))
    with pytest.raises(EngineError):
        family.build_prompt(request(messages, None, "required"))


def test_legacy_function_call_round(family):
    messages = [
        {"role": "user", "content": "price of 10111?"},
        {"role": "assistant", "content": None, "function_call": {"name": "track", "arguments": '{"symbol": "10111"}'}},
        {"role": "function", "name": "track", "content": '{"price": 12.5}'},
    ]
    ids = family.build_prompt(request(messages, [{"name": "track", "parameters": {}}])).token_ids
    text = family.tokenizer.decode(ids)
    call = "<|assistant|> track\n ```python\ntool_call(symbol='10111')\n```"
    assert text.endswith(call + '<|observation|> \n {"price": 12.5}<|assistant|>')


def test_several_calls_become_several_turns(family):
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "track", "arguments": f'{{"symbol": "{i}"}}'}}
             for i in range(2)]  # fmt: skip
    messages = [{"role": "user", "content": "both"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    text = family.tokenizer.decode(family.build_prompt(request(messages)).token_ids)
    assert "both<|assistant|> track\n ```python\ntool_call(symbol='0')\n```<|assistant|> track\n" in text


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "wizard", "content": "hi"}],
        [{"role": "assistant", "tool_calls": [{"function": {"name": "track", "arguments": "{not json"}}]}],
        [{"role": "assistant", "tool_calls": [{"function": {"name": "track", "arguments": "[1, 2]"}}]}],
        [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
    ],
)
def test_requests_that_cannot_be_expressed(family, messages):
    with pytest.raises(EngineError):
        family.build_prompt(request(messages))
