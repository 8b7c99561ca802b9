"""python -m server.merge: the merged checkpoint serves exactly what the unmerged adapter serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import torch

from server.config import Settings
from server.merge import MergeError, merge
from tests.support import CHATGLM3_FIXTURES, REPO, ThreadedServer
from tests.tiny_models import hand_merged_chatglm3, make_chatglm3_lora, make_lora, tiny_llama

PROMPTS = ["Write a SQL query that counts users.", "Tell me a story about a fox."]


def answers(model_path: str, model: str, **settings) -> list[str]:
    from server.app import create_app

    app = create_app(Settings(model_path=model_path, served_model_name="base", embedding_path="none",
                              dtype="float32", web_ui=False, **settings))
    out = []
    with ThreadedServer(app) as srv:
        for prompt in PROMPTS:
            r = httpx.post(srv.base_url + "/chat/completions", timeout=120, json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
                "temperature": 0})  # fmt: skip
            assert r.status_code == 200, r.text
            out.append(r.json()["choices"][0]["message"]["content"])
    return out


def test_merged_llama_answers_like_the_served_adapter(tmp_path):
    base = tiny_llama()
    adapter = make_lora(base, tmp_path / "adapter", seed=3, targets=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "server.merge", str(base), str(adapter), str(out),
                           "--dtype", "float32"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "Serve it with: MODEL_PATH=" in proc.stderr  # progress lines go to the log (stderr)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists() and not (
        tmp_path / "merged.partial").exists()

    served = answers(str(base), "sql", lora_modules=f"sql={adapter}")
    assert answers(str(out), "base") == served
    assert answers(str(base), "base") != served  # the adapter does change the answers


def test_merged_chatglm3_is_a_chatglm3_checkpoint(tmp_path):
    from server.backends.native.device import place
    from server.backends.native.loader import load_chat_model
    from server.families.chatglm3 import load_chatglm3

    adapter, deltas = make_chatglm3_lora(tmp_path / "adapter", seed=4)
    out = merge(str(CHATGLM3_FIXTURES / "tiny-chatglm3"), str(adapter), tmp_path / "merged", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["torch_dtype"] == "float32"
    assert (out / "tokenizer.model").exists() and (out / "tokenizer_config.json").exists()

    loaded = load_chat_model(str(out), place("cpu", "float32"), cache_dir="/nonexistent")
    assert loaded.family.name == "chatglm3"  # the server's ChatGLM3 road: prompt format, tools, stop tokens
    reference = load_chatglm3(hand_merged_chatglm3(tmp_path / "by-hand", deltas), dtype=torch.float32)
    ids = torch.tensor([[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        merge(str(tiny_llama()), str(tmp_path), tmp_path / "out")
