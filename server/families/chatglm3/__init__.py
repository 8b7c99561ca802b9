"""ChatGLM3-6B served natively: sentencepiece tokenizer, THUDM prompt rules, tool calls, GlmForCausalLM weights.

Importing the package does not import torch or transformers; `load_chatglm3` imports them when called.
"""

from server.families.chatglm3.family import ChatGLM3Family
from server.families.chatglm3.tokenizer import ChatGLM3Tokenizer

__all__ = ["ChatGLM3Family", "ChatGLM3Tokenizer", "is_chatglm_config", "load_chatglm3"]


def __getattr__(name: str):
    # weights.py needs torch + transformers; the API layer imports families without them.
    if name in ("is_chatglm_config", "check_chatglm3_config", "load_chatglm3", "chatglm_config_to_glm"):
        from server.families.chatglm3 import weights

        return getattr(weights, name)
    raise AttributeError(name)
