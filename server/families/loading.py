"""A model folder (or hub id) -> its family: tokenizer, prompt rules, stop ids. No weights are loaded.

Every engine gets its family here: native loads the weights beside it, vLLM only ever sees token ids.
"""

from __future__ import annotations

from server.model_files import read_config


def load_family(path: str, config: dict | None = None):
    """ChatGLM3 for THUDM's `chatglm` checkpoints, the tokenizer's chat template for everything else."""
    from server.families.chatglm3 import ChatGLM3Family, check_chatglm3_config, is_chatglm_config

    config = read_config(path) if config is None else config
    if is_chatglm_config(config):
        check_chatglm3_config(config)  # a clear refusal (v1, ChatGLM2, GLM-4...) before any weight is fetched
        return ChatGLM3Family.from_pretrained(path)
    from transformers import AutoTokenizer, GenerationConfig

    from server.families.chat_template import ChatTemplateFamily

    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: the model config's eos
        eos = config.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return ChatTemplateFamily(AutoTokenizer.from_pretrained(path), eos_ids)
