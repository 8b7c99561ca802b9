"""The finished adapter in DIR, ready to serve: peft's layout on the served model's module names (LORA_MODULES
loads it as it is), plus, for ChatGLM3, DIR/vllm/ with the same update on THUDM's original module names
(server/families/chatglm3/lora_layout.py), which vLLM's ChatGLM LoRA and THUDM's code load."""

from __future__ import annotations

import json
from pathlib import Path

VLLM_DIR = "vllm"


def write_adapter(model, out: Path, chatglm3: bool) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out, save_embedding_layers=False)  # LoRA weights only, never a copy of the base
    (out / "README.md").unlink(missing_ok=True)  # peft's empty model card template; our summary says more
    written = {"adapter": out}
    if chatglm3:
        from server.families.chatglm3.lora_layout import original_adapter

        config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
        weights = load_file(str(out / "adapter_model.safetensors"))
        vllm_config, vllm_weights = original_adapter(config, weights)
        target = out / VLLM_DIR
        target.mkdir(exist_ok=True)
        save_file(vllm_weights, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
        (target / "adapter_config.json").write_text(json.dumps(vllm_config, indent=2, ensure_ascii=False),
                                                    encoding="utf-8")
        written["vllm"] = target
    return written
