"""Settings -> a LlamaCppBackend and the family that renders its prompts. Cheap: `start()` does the slow part.

llama.cpp loads a GGUF file; our family code needs a Hugging Face folder (tokenizer, chat template, ChatGLM3's
sentencepiece model). A .gguf MODEL_PATH gives both (the folder is the converted copy every engine uses); a
folder MODEL_PATH gives the family, and the GGUF is LLAMACPP_GGUF or a copy converted once into CACHE_DIR
(`python -m server.convert`, f16). LORA_MODULES' peft adapters become GGUF adapter files beside it (lora.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from server.backends.llamacpp.backend import LlamaCppBackend
from server.backends.llamacpp.lora import gguf_adapters
from server.backends.llamacpp.supervisor import LlamaSupervisor
from server.config import Settings, derive_model_name
from server.errors import ConfigError
from server.model_files import context_length, model_folder

log = logging.getLogger("glm_serve.llamacpp")


def build_llamacpp_backend(settings: Settings, *, model_path: str, adapters: dict[str, str]):
    """(backend, family folder) for the resolved MODEL_PATH."""
    if settings.quantization != "none":
        raise ConfigError(f"QUANTIZATION={settings.quantization} is bitsandbytes, which llama.cpp does not use: "
                          "serve a quantized GGUF instead (python -m server.convert MODEL OUT.gguf --type q8_0 or "
                          "q4_0, or any Q4/Q8 GGUF file as MODEL_PATH).")
    folder = model_folder(model_path, settings.cache_dir)
    if model_path.endswith(".gguf"):
        gguf, why = model_path, ""
    elif settings.llamacpp_gguf:
        gguf, why = settings.llamacpp_gguf, "LLAMACPP_GGUF"
    else:
        gguf, why = _converted(model_path, settings), "converted from MODEL_PATH"
    if not Path(gguf).is_file():
        raise ConfigError(f"llama.cpp's GGUF {gguf} does not exist.")
    loras = gguf_adapters(adapters, base_gguf=gguf, cache_dir=settings.cache_dir)
    if bad := next((a for a in loras if "," in a.path), None):
        raise ConfigError(f"LoRA adapter {bad.name!r}: llama-server splits --lora at commas, and {bad.path} has one.")
    context = context_length(folder, settings.max_model_len)
    served = settings.served_model_name or derive_model_name(settings.model_path)
    supervisor = LlamaSupervisor(settings, gguf=gguf, served_name=served, context=context,
                                 loras=tuple(a.path for a in loras))
    summary = {"why_gguf": why, "args": settings.llamacpp_args}
    if loras:
        summary["lora"] = ", ".join(f"{a.name} ({'converted: ' if a.converted else ''}{a.path})" for a in loras)
    backend = LlamaCppBackend(supervisor, gguf=gguf, context_length=context,
                              max_running=settings.max_running_requests, max_waiting=settings.max_waiting_requests,
                              request_timeout=settings.request_timeout, adapters=[a.name for a in loras],
                              summary=summary)
    return backend, folder


def _converted(model_path: str, settings: Settings) -> str:
    from server.convert import cached_gguf

    return str(cached_gguf(model_path, Path(settings.cache_dir).expanduser(), "f16"))
