"""Training on the tiny models: the loss goes down, a resumed run ends on the same weights, QLoRA runs on this CPU,
the output folder is complete, ChatGLM3's vLLM-layout adapter is the same update, and --plan adds up."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import config_from_argv, main
from finetune.run import run
from tests.finetune_support import ALPACA_ROW, ALPACA_ROW_ZH, FAST, one_thread, tiny, write_rows
from tests.support import CHATGLM3_FIXTURES

ROWS = [ALPACA_ROW, ALPACA_ROW_ZH, {"instruction": "Name a color.", "input": "", "output": "Blue.",
                                   "history": [["Hi", "Hello!"]]},
        {"instruction": "2 + 2 =", "input": "", "output": "4"}]


def train(tmp_path, model: str, name: str, *flags: str, on_step=None, rows=ROWS):
    data = write_rows(tmp_path / "train.json", rows)
    path, extra = tiny(model)
    cfg = config_from_argv([str(data), "--model", path, "--out", str(tmp_path / name), *extra, *flags])
    with one_thread():
        return run(cfg, on_step=on_step)


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "loss_log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("model", ["llama", "chatglm3"])
def test_training_lowers_the_loss_and_writes_everything(tmp_path, model):
    result = train(tmp_path, model, "out", "--max-steps", "12", "--lr", "1e-2", "--batch-size", "2",
                   "--eval-split", "0.25", "--save-steps", "5")
    out, s = result.out, result.summary
    curve = losses(out)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < 0.7 * curve[0], curve
    assert s["steps"] == 12 and s["data"]["train_examples"] == 3 and s["data"]["eval_examples"] == 1
    assert s["eval_loss"] is not None and s["tokens_per_s"] > 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "finetune_config.yaml", "data_summary.json",
                 "summary.json", "loss_log.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000005", "step-000010", "step-000012"]
    evals = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [e["step"] for e in evals] == [2, 4, 6, 8, 10, 12]  # every epoch (2 steps of batch 2) and the end
    assert f"LORA_MODULES=out={out.resolve()}" in s["serve"] and "serve it" in result.text
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny(model)[0]
    # tiny ChatGLM3 adapts output_layer too (tests/finetune_support.py), which vLLM's ChatGLM LoRA cannot take
    assert not (out / "vllm").exists()


def test_resume_reaches_the_same_weights_as_one_uninterrupted_run(tmp_path):
    """Dropout on, accumulation on: the run killed after step 5 resumes from its step-4 checkpoint and ends on the
    bit-identical weights, optimizer moments and losses of the run that never stopped."""
    flags = ["--max-steps", "8", "--lr", "5e-3", "--batch-size", "1", "--gradient-accumulation", "2",
             "--lora-dropout", "0.1", "--save-steps", "2", "--eval-split", "0", "--warmup-steps", "2"]
    whole = train(tmp_path, "llama", "whole", *flags)

    def crash(step):
        if step == 5:
            raise KeyboardInterrupt  # what Ctrl-C or a dying process leaves: checkpoints up to step 4

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "llama", "resumed", *flags, on_step=crash)
    assert (tmp_path / "resumed" / "checkpoints" / "step-000004").is_dir()
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()
    resumed = train(tmp_path, "llama", "resumed", *flags, "--resume")
    assert resumed.summary["resumed_from"].endswith("step-000004") and resumed.summary["steps"] == 8
    a, b = (load_file(str(r.out / "adapter_model.safetensors")) for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(whole.out) == losses(resumed.out)
    opt_a, opt_b = (torch.load(r.out / "checkpoints" / "step-000008" / "optimizer.pt") for r in (whole, resumed))
    assert all(torch.equal(opt_a["state"][i]["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"]) for i in opt_a["state"])


def test_resume_refuses_other_settings(tmp_path):
    train(tmp_path, "llama", "run", "--max-steps", "2", "--save-steps", "1")
    data, (path, _) = tmp_path / "train.json", tiny("llama")
    with pytest.raises(SystemExit) as exit_:
        main([str(data), "--model", path, "--out", str(tmp_path / "run"), "--resume", "--lr", "0.1"])
    assert "learning_rate (0.0003 -> 0.1)" in str(exit_.value.code)


def test_qlora_trains_a_4bit_base_on_this_cpu(tmp_path):
    """bitsandbytes' 4-bit nf4 layers run forward and backward on CPU (bitsandbytes >= 0.45); the adapter then
    serves on the 4-bit base the server loads for QUANTIZATION=4bit."""
    from server.backends.native.device import place
    from server.backends.native.loader import load_chat_model
    from server.backends.native.lora import attach_adapters

    result = train(tmp_path, "llama", "q", "--method", "qlora", "--max-steps", "8", "--lr", "1e-2", *FAST,
                   rows=[ALPACA_ROW])
    curve = losses(result.out)
    assert curve[-1] < 0.6 * curve[0], curve
    assert "QUANTIZATION=4bit" in result.summary["serve"]
    loaded = load_chat_model(tiny("llama")[0], place("cpu", "float32", "4bit"), cache_dir=str(tmp_path))
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    served, keys = attach_adapters(loaded.model, {"q": str(result.out)})
    ids = torch.tensor([[1, 9690, 198, 2683, 359]])
    with torch.no_grad(), one_thread():
        base = served(input_ids=ids, adapter_names=["__base__"]).logits
        tuned = served(input_ids=ids, adapter_names=[keys["q"]]).logits
    assert (tuned - base).abs().max() > 0.1


def test_chatglm3_vllm_layout_is_the_same_update(tmp_path):
    """DIR/vllm holds the adapter on THUDM's names (fused query_key_value of rank 3r, the rest zero-padded to 3r,
    each module's scale folded into B so alpha = r): the server's own translation of it gives DIR's logits."""
    from server.backends.native.lora import attach_adapters
    from server.families.chatglm3 import load_chatglm3

    result = train(tmp_path, "chatglm3", "glm", "--max-steps", "3", "--lr", "5e-2", "--lora-rank", "4", *FAST,
                   "--target-modules", "query_key_value,dense,dense_h_to_4h,dense_4h_to_h")  # vLLM's four
    vllm_dir = result.out / "vllm"
    config = json.loads((vllm_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (12, 12)
    assert config["target_modules"] == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    weights = load_file(str(vllm_dir / "adapter_model.safetensors"))
    qkv_b = weights["base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_B.weight"]
    assert qkv_b.shape == (64 + 2 * 32, 12) and all(k.startswith("base_model.model.transformer.") for k in weights)
    model = load_chatglm3(CHATGLM3_FIXTURES / "tiny-chatglm3", dtype=torch.float32)
    served, keys = attach_adapters(model, {"native": str(result.out), "vllm": str(vllm_dir)})
    ids = torch.tensor([[64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]] * 3)
    with torch.no_grad():
        logits = served(input_ids=ids, adapter_names=["__base__", keys["native"], keys["vllm"]]).logits
    torch.testing.assert_close(logits[2], logits[1], atol=1e-5, rtol=0)
    assert (logits[1] - logits[0]).abs().max() > 0.1


def test_plan_counts_lora_and_fits_qlora(capsys):
    """ChatGLM3-6B's real config: r=8 on the four standard modules (q, k and v with a LoRA each) is 16.66 M
    parameters; the base weights are the server planner's figures (11.63 GiB bf16, 3.74 GiB 4-bit nf4)."""
    main(["--plan", "--model", str(CHATGLM3_FIXTURES), "--method", "qlora", "--batch-size", "1"])
    text = capsys.readouterr().out
    assert "r=8 on q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj: 16.66 M parameters" in text
    rows = {line[:38].strip(): line[38:].split() for line in text.splitlines() if " base" in line[:38]}
    assert rows["QLoRA, 4-bit nf4 base <- settings"][:2] == ["3.74", "GiB"]
    assert rows["LoRA, bf16/fp16 base"][:4] == ["11.63", "GiB", "0.25", "GiB"]  # 16.66 M x 16 bytes
