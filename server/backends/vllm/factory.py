"""Settings -> a VLLMBackend: connect to VLLM_URL, or launch vLLM from VLLM_PYTHON. Cheap: nothing starts here
except the one-time translation of GLM-named LoRA adapters (adapters.py); `start()` does the slow part."""

from __future__ import annotations

import json
from pathlib import Path

from server.backends.vllm.adapters import max_lora_rank, prepare_adapters
from server.backends.vllm.backend import VLLMBackend
from server.backends.vllm.remote import Remote
from server.backends.vllm.supervisor import Supervisor
from server.backends.vllm.tokenizer_folder import tokenizer_folder
from server.config import Settings, derive_model_name
from server.errors import ConfigError
from server.model_files import context_length


def build_vllm_backend(settings: Settings, *, model_folder: str, adapters: dict[str, str], family) -> VLLMBackend:
    """`model_folder`: what vLLM loads (a GGUF already converted to a folder, or a hub id); `adapters`: served
    model id -> adapter folder (LORA_MODULES); `family`: the model's family, whose vocabulary a launched vLLM needs
    for structured outputs (ChatGLM3's own tokenizer is remote code vLLM cannot load)."""
    if settings.vllm_url and settings.vllm_python:
        raise ConfigError("Set VLLM_URL (connect to a running vLLM) or VLLM_PYTHON (glm-serve starts vLLM), not both.")
    config = _local_config(model_folder)
    common = dict(
        context_length=context_length(model_folder, settings.max_model_len),
        max_running=settings.max_running_requests,
        max_waiting=settings.max_waiting_requests,
        request_timeout=settings.request_timeout,
        vocab_size=config.get("padded_vocab_size") or config.get("vocab_size"),
        api_key=settings.vllm_api_key,
    )
    if settings.vllm_url:
        # The adapters must already be loaded there (vllm serve --enable-lora --lora-modules); start() checks.
        return VLLMBackend(Remote(settings.vllm_url), adapters={name: name for name in adapters},
                           summary={"model": model_folder}, **common)
    if not settings.vllm_python:
        raise ConfigError("The vLLM engine needs VLLM_URL or VLLM_PYTHON.")
    prepared = prepare_adapters(adapters, model_folder=model_folder, cache_dir=settings.cache_dir)
    served = settings.served_model_name or derive_model_name(settings.model_path)
    tokenizer = tokenizer_folder(family, settings.cache_dir)
    supervisor = Supervisor(settings, model_folder=model_folder, served_name=served, adapters=prepared,
                            tokenizer=tokenizer)
    placement = (f"dtype {settings.dtype}   tensor parallel {settings.tensor_parallel_size} x pipeline parallel "
                 f"{settings.pipeline_parallel_size}   GPU memory {settings.gpu_memory_utilization:.0%}"
                 + (f"   quantization {settings.quantization}" if settings.quantization != "none" else "")
                 + (f"   VLLM_ARGS {settings.vllm_args}" if settings.vllm_args else ""))
    lora = ", ".join(f"{a.name}" + (" (translated from GLM module names)" if a.translated else "") for a in prepared)
    summary = {"model": model_folder, "placement": placement}
    if prepared:
        summary["lora"] = f"{lora}   max rank {max_lora_rank(prepared)}"
    return VLLMBackend(supervisor, adapters={a.name: a.name for a in prepared}, summary=summary, **common)


def _local_config(folder: str) -> dict:
    path = Path(folder) / "config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
