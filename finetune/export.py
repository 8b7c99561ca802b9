"""The finished adapter in DIR, ready to serve: peft's layout on the served model's module names (LORA_MODULES
loads it as it is), plus, for ChatGLM3, DIR/vllm/ with the same update on THUDM's original module names, which
vLLM's ChatGLM LoRA and THUDM's code load (the vLLM backend's own translation: server/backends/vllm/adapters.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from server.errors import ConfigError

log = logging.getLogger("glm_serve.finetune")

VLLM_DIR = "vllm"


def write_adapter(model, out: Path, chatglm3: bool) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out, save_embedding_layers=False)  # LoRA weights only, never a copy of the base
    (out / "README.md").unlink(missing_ok=True)  # peft's empty model card template; our summary says more
    written = {"adapter": out}
    if chatglm3:
        from server.backends.vllm.adapters import translate_glm_adapter

        config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
        weights = load_file(str(out / "adapter_model.safetensors"))
        glm = model.config
        base = {"kv_channels": glm.head_dim, "num_attention_heads": glm.num_attention_heads,
                "multi_query_attention": True, "multi_query_group_num": glm.num_key_value_heads}
        try:
            vllm_weights, vllm_config = translate_glm_adapter(weights, config, base, adapter=str(out))
        except ConfigError as exc:  # e.g. output_layer adapted: vLLM's ChatGLM takes LoRA on four modules only
            log.warning("No %s/ layout for vLLM: %s", VLLM_DIR, exc.message)
            return written
        target = out / VLLM_DIR
        target.mkdir(exist_ok=True)
        save_file(vllm_weights, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
        (target / "adapter_config.json").write_text(json.dumps(vllm_config, indent=2, ensure_ascii=False),
                                                    encoding="utf-8")
        written["vllm"] = target
    return written
