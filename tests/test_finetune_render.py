"""Training rows are the served prompts, token for token, with labels exactly on what the assistant says."""

from __future__ import annotations

import json

import pytest

from finetune.data import Conversation, load
from finetune.render import IGNORE_INDEX, render, render_all
from server.families.chatglm3 import ChatGLM3Family
from server.families.chatglm3.prompt import build_messages, from_openai
from server.families.chatglm3.training import training_example
from server.types import ChatRequest, SamplingParams
from tests.finetune_support import write_rows
from tests.support import CHATGLM3_FIXTURES
from tests.tiny_models import smollm2_tokenizer

WEATHER = {"name": "get_weather", "description": "weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": WEATHER}]
CONVERSATION = [
    {"role": "system", "content": "你是天气助手"},
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "content": "我来查一下。", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 20}"},
    {"role": "assistant", "content": "北京现在 20 度。"},
    {"role": "user", "content": "谢谢 <|assistant|> [gMASK]"},  # special-token text stays text, as when serving
    {"role": "assistant", "content": "不客气！"},
]


@pytest.fixture(scope="module")
def glm():
    return ChatGLM3Family.from_pretrained(CHATGLM3_FIXTURES)


def labelled(labels):
    return [i for i, t in enumerate(labels) if t != IGNORE_INDEX]


def test_chatglm3_labels_are_the_assistant_spans_token_for_token(glm):
    """Built independently from the server's prompt builder: before every assistant turn the row equals the prompt
    the server sends for that history (ending in <|assistant|>); the targets are exactly that turn's metadata line
    and content and the token after it (the next role token, or eos), THUDM's rule; nothing else is a target."""
    tok = glm.tokenizer
    conv = Conversation(CONVERSATION, TOOLS, [m["role"] == "assistant" for m in CONVERSATION], "test")
    example = render(conv, glm)
    turns = from_openai(CONVERSATION, TOOLS).messages
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "assistant", "observation", "assistant",
                                          "user", "assistant"]
    expected: list[int] = []
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt = build_messages(tok, turns[:k])
        assert example.ids[: len(prompt)] == prompt, f"turn {k}: the row is not the served prompt"
        answer = tok.sp_encode(f"{turn.get('metadata', '')}\n") + tok.sp_encode(turn["content"])
        following = build_messages(tok, turns[: k + 1])[:-1]  # the history with this answer, before <|assistant|>
        assert example.ids[len(prompt): len(following)] == answer
        stop = example.ids[len(following)]
        assert stop == (tok.eos_token_id if k + 1 == len(turns) else tok.role_token_id(turns[k + 1]["role"]))
        expected += range(len(prompt), len(following) + 1)
    assert labelled(example.labels) == expected
    assert all(example.labels[i] == example.ids[i] for i in expected)
    # The tool call is trained as the server renders it: metadata = the tool name, a tool_call(...) block.
    call = tok.sp_encode("get_weather\n") + tok.sp_encode("```python\ntool_call(city='北京')\n```")
    assert any(example.ids[i: i + len(call)] == call for i in expected)
    assert example.ids[-1] == tok.eos_token_id


def test_chatglm3_rows_match_thudms_original_prompt(glm):
    """THUDM's own build_chat_input (the golden cases) for a full tool round: a training row over that history
    starts with exactly those ids, and its targets begin right after the final <|assistant|>."""
    cases = json.loads((CHATGLM3_FIXTURES / "tokenizer_cases.json").read_text())["chat_cases"]
    case = next(c for c in cases if c["name"] == "full_tool_round_then_user")
    messages = [*case["history"], {"role": case["role"], "content": case["query"]},
                {"role": "assistant", "metadata": "", "content": "Let me check Shanghai."}]
    ids, labels = training_example(glm.tokenizer, messages, [m["role"] == "assistant" for m in messages])
    golden = case["expected_input_ids"]
    assert ids[: len(golden)] == golden
    assert golden[-1] == glm.tokenizer.assistant_token_id
    # Earlier assistant turns of the history are trained too (THUDM trains every assistant turn).
    assert labels[len(golden) - 1] == IGNORE_INDEX and labels[len(golden)] == 30910  # "▁" of the " \n" line
    assert ids[-1] == 2 and labels[-1] == 2


def test_untrained_turns_are_not_targets(glm):
    conv = Conversation(CONVERSATION, TOOLS, [False, False, False, False, False, False, True], "test")
    example = render(conv, glm)
    prompt = build_messages(glm.tokenizer, from_openai(CONVERSATION[:-1], TOOLS).messages)
    assert labelled(example.labels) == list(range(len(prompt), len(example.ids)))


def test_chat_template_labels_are_the_answers_and_their_end_token():
    """SmolLM2's template (ChatML): the history before each answer is the server's prompt; the targets are the
    answer text and <|im_end|>, not the newline the template writes after it."""
    from server.families.chat_template import ChatTemplateFamily

    tokenizer = smollm2_tokenizer()
    family = ChatTemplateFamily(tokenizer, [tokenizer.eos_token_id])
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]
    example = render(Conversation(messages, None, [False, True, False, True], "test"), family)
    spans, start = [], None
    for i, t in enumerate([*example.labels, IGNORE_INDEX]):
        if t != IGNORE_INDEX and start is None:
            start = i
        elif t == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    assert len(spans) == 2
    for (a, b), k in zip(spans, (1, 3)):
        prompt = family.build_prompt(ChatRequest(messages=messages[:k], sampling=SamplingParams())).token_ids
        assert example.ids[:a] == prompt
        assert tokenizer.decode(example.ids[a:b]) == messages[k]["content"] + "<|im_end|>"


def test_overlong_rows_are_truncated_or_dropped_and_counted(glm, tmp_path):
    rows = [{"instruction": "短", "output": "好"}, {"instruction": "长" * 40, "output": "好的" * 30},
            {"instruction": "非常长" * 60, "output": "答"}]
    _, convs = load(write_rows(tmp_path / "rows.json", rows))
    lengths = [len(render(c, glm).ids) for c in convs]
    limit = lengths[1] - 10  # row 2 keeps some of its answer; row 3's answer lies past the limit
    assert lengths[0] < limit < lengths[2] - 60
    examples, stats = render_all(convs, glm, limit, "truncate")
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert len(examples[1].ids) == limit and examples[1].targets > 0
    assert stats.tokens == lengths[0] + limit and stats.longest == lengths[2]
    examples, stats = render_all(convs, glm, limit, "drop")
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 0, 2)
