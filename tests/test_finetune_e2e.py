"""The whole loop as a user runs it: `python -m finetune` on one Alpaca row, then `python -m server` with
LORA_MODULES=name=DIR, asked over HTTP with the openai SDK: the adapter answers the instruction with the trained
output (greedy) and stops there; the base model, asked the same, does not."""

from __future__ import annotations

import openai
import pytest

from tests.finetune_support import ALPACA_ROW, ALPACA_ROW_ZH, FAST, finetune_cli, tiny, write_rows
from tests.support import running_server

CASES = {"llama": (ALPACA_ROW, "1e-2"), "chatglm3": (ALPACA_ROW_ZH, "2e-2")}


@pytest.mark.parametrize("model", list(CASES))
def test_the_served_adapter_answers_its_trained_row(tmp_path, model):
    row, lr = CASES[model]
    path, extra = tiny(model)
    data = write_rows(tmp_path / "train.json", [row])
    out = tmp_path / "my-adapter"
    done = finetune_cli([str(data), "--model", path, "--out", str(out), "--max-steps", "40", "--lr", lr, *FAST,
                         *extra])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "serve it" in done.stdout and f"LORA_MODULES=my-adapter={out}" in done.stdout
    assert "fine-tuning: 100%" in done.stderr  # the progress bar reached the end
    env = {"MODEL_PATH": path, "LORA_MODULES": f"my-adapter={out}", "DTYPE": "float32", "EMBEDDING_PATH": "none",
           "SERVED_MODEL_NAME": "base", "WEB_UI": "false"}
    with running_server(env, name=f"finetune-{model}") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)
        assert {"base", "my-adapter"} <= {m.id for m in client.models.list()}

        def ask(name: str):
            return client.chat.completions.create(model=name, temperature=0, max_tokens=16, messages=[
                {"role": "user", "content": row["instruction"]}]).choices[0]

        tuned, base = ask("my-adapter"), ask("base")
    assert tuned.message.content == row["output"] and tuned.finish_reason == "stop"
    assert base.message.content != row["output"]
