"""Fine-tuning data: each format parses into the conversation the server would receive; every bad row is an error
that names file, row and field, and a run that fails on its data writes nothing."""

from __future__ import annotations

import json

import pytest

from finetune.cli import config_from_argv, main
from finetune.config import ConfigError
from finetune.data import DataError, load
from tests.finetune_support import ALPACA_ROW, finetune_cli, write_rows
from tests.tiny_models import tiny_llama

TOOL = {"name": "get_weather", "description": "weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_alpaca_rows_with_history_system_and_input(tmp_path):
    rows = [ALPACA_ROW, {"instruction": "Translate to French", "input": "good morning", "output": "bonjour",
                         "system": "You translate.", "history": [["hi", "hello"]]}]
    for jsonl in (False, True):
        fmt, convs = load(write_rows(tmp_path / f"a{jsonl}.json", rows, jsonl=jsonl))
        assert fmt == "alpaca" and len(convs) == 2
        assert convs[0].messages == [{"role": "user", "content": ALPACA_ROW["instruction"]},
                                     {"role": "assistant", "content": "Tranquility Base."}]
        assert convs[1].messages == [
            {"role": "system", "content": "You translate."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Translate to French\ngood morning"},
            {"role": "assistant", "content": "bonjour"}]
        assert convs[1].trained == [False, False, True, False, True]
    one = tmp_path / "one.json"
    one.write_text(json.dumps(ALPACA_ROW))  # a file holding a single object is one row
    assert len(load(one)[1]) == 1


def test_chatglm3_conversations_with_tools_tool_turns_and_loss(tmp_path):
    row = {"tools": [TOOL], "conversations": [
        {"role": "system", "content": "你是助手"}, {"role": "user", "content": "北京天气"},
        {"role": "assistant", "content": "我查一下。", "loss": False},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 20}},
        {"role": "assistant", "content": "20度。"}, {"role": "user", "content": "谢谢"},
        {"role": "observation", "content": "ok"}, {"role": "assistant", "content": "不客气"}]}
    fmt, [conv] = load(write_rows(tmp_path / "glm.json", [row]))
    assert fmt == "chatglm3"
    assert conv.tools == [{"type": "function", "function": TOOL}]
    assert conv.messages[3] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]}
    assert conv.messages[4] == {"role": "tool", "content": '{"temp": 20}'}
    assert conv.messages[7] == {"role": "tool", "content": "ok"}
    assert conv.trained == [False, False, False, True, False, True, False, False, True]


def test_openai_jsonl_with_tools_calls_and_weight(tmp_path):
    row = {"tools": [{"type": "function", "function": TOOL}], "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny.", "weight": 0},
        {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "You're welcome."}]}
    fmt, convs = load(write_rows(tmp_path / "oa.jsonl", [row, row], jsonl=True))
    conv = convs[1]
    assert fmt == "openai" and len(convs) == 2
    assert conv.messages[1] == {"role": "user", "content": "weather?"}
    assert conv.messages[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert conv.trained == [False, False, True, False, False, False, True]


BAD = [  # (rows, jsonl, the words the error must contain)
    ([{"instruction": "q"}], False, ["row 1", "'output'", "missing"]),
    ([ALPACA_ROW, {"instruction": "q", "output": 3}], False, ["row 2", "'output'", "must be a string"]),
    ([ALPACA_ROW, {"instruction": "q", "output": " "}], False, ["row 2", "'output'", "empty"]),
    ([{**ALPACA_ROW, "history": [["only one"]]}], False, ["row 1", "'history[0]'", "pair"]),
    ([ALPACA_ROW, {"messages": []}], True, ["row 2 (line 2)", "'instruction'", "missing"]),
    ([{"conversations": [{"role": "robot", "content": "x"}]}], False, ["'conversations[0].role'", "robot"]),
    ([{"conversations": [{"role": "user", "content": "x"}, {"role": "tool", "name": "f", "parameters": {}}]}],
     False, ["'conversations[1].observation'", "missing"]),
    ([{"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss": False}]}],
     False, ["row 1", "no assistant answer"]),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}], True,
     ["row 1 (line 1)", "'messages[1].content'", "missing"]),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 5}]}], True,
     ["'messages[1].weight'"]),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
       "tools": [{"type": "function", "function": {"description": "no name"}}]}], True, ["'tools[0].name'"]),
    ([{"prompt": "x", "completion": "y"}], True, ["row 1", "cannot tell the format"]),
]


@pytest.mark.parametrize("rows,jsonl,words", BAD, ids=[w[-1] for _, _, w in BAD])
def test_bad_rows_name_file_row_and_field(tmp_path, rows, jsonl, words):
    path = write_rows(tmp_path / ("data.jsonl" if jsonl else "data.json"), rows, jsonl=jsonl)
    with pytest.raises(DataError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(path.name), message
    for word in words:
        assert word in message, message


def test_broken_json_and_wrong_format(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ALPACA_ROW) + "\n{\"instruction\": \n")
    with pytest.raises(DataError, match=r"broken.jsonl row 2 \(line 2\): not valid JSON"):
        load(broken)
    alpaca = write_rows(tmp_path / "a.json", [ALPACA_ROW])
    with pytest.raises(DataError, match=r"a.json row 1: field 'messages' is missing \(the openai format"):
        load(alpaca, "openai")
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load(empty)


def test_a_bad_row_exits_nonzero_and_writes_nothing(tmp_path):
    """The real command: exit status 1, the error on stderr, no output folder."""
    data = write_rows(tmp_path / "train.jsonl", [ALPACA_ROW, ALPACA_ROW, {"instruction": "q"}], jsonl=True)
    out = tmp_path / "out"
    done = finetune_cli([str(data), "--model", str(tiny_llama()), "--out", str(out)], timeout=120)
    assert done.returncode == 1, done.stderr
    assert "train.jsonl row 3 (line 3): field 'output' is missing" in done.stderr
    assert not out.exists()


def test_a_row_the_model_cannot_render_writes_nothing(tmp_path):
    """Rendering errors come after the model loads but still before DIR exists: SmolLM2's template has no tools."""
    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
           "tools": [{"type": "function", "function": TOOL}]}
    data = write_rows(tmp_path / "tools.jsonl", [row], jsonl=True)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main([str(data), "--model", str(tiny_llama()), "--out", str(out)])
    assert "tools.jsonl row 1 (line 1): field 'tools'" in str(exit_.value.code)
    assert not out.exists()


def test_an_existing_folder_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    data = write_rows(tmp_path / "a.json", [ALPACA_ROW])
    with pytest.raises(SystemExit) as exit_:
        main([str(data), "--model", str(tiny_llama()), "--out", str(tmp_path / "out")])
    assert "exists and is not empty" in str(exit_.value.code)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_yaml_config_flags_win_and_typos_fail(tmp_path):
    yaml_file = tmp_path / "lora.yaml"
    yaml_file.write_text("data: train.json\nout: runs/a\nlearning-rate: 1e-4\nlora_rank: 16\n"
                         "target_modules: [q_proj, v_proj]\nmethod: qlora\nquant_double: no\n")
    cfg = config_from_argv(["--config", str(yaml_file), "--lora-rank", "4"])
    assert (cfg.data, cfg.out, cfg.learning_rate, cfg.lora_rank) == ("train.json", "runs/a", 1e-4, 4)
    assert (cfg.target_modules, cfg.method, cfg.quant_double) == ("q_proj,v_proj", "qlora", False)
    assert config_from_argv(["d.json", "--out", "o", "--lr", "2e-5"]).learning_rate == 2e-5
    yaml_file.write_text("lerning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="unknown setting 'lerning_rate'"):
        config_from_argv(["--config", str(yaml_file)])
    with pytest.raises(ConfigError, match="--eval-split"):
        config_from_argv(["d.json", "--out", "o", "--eval-split", "1.5"])
    with pytest.raises(SystemExit):  # argparse: not a choice
        config_from_argv(["d.json", "--out", "o", "--method", "full"])
