"""Settings -> a ready engine and embedder, plus the one-screen startup summary."""

from __future__ import annotations

import ipaddress
import logging

from server.config import (
    Settings,
    derive_model_name,
    resolve_embedding_path,
    resolve_model_path,
)
from server.errors import ConfigError
from server.serving.chat import ChatService

log = logging.getLogger("glm_serve")


def engine_choice(settings: Settings) -> tuple[str, str]:
    """(engine, why): ENGINE=auto picks vLLM when one is configured, else llama.cpp for a .gguf model when it is
    configured (LLAMA_SERVER) or installed (the llamacpp extra) and can load its LORA_MODULES, else our native
    engine."""
    if settings.engine == "native":
        return "native", "ENGINE=native"
    vllm_configured = bool(settings.vllm_url or settings.vllm_python)
    if settings.engine == "vllm":
        if not vllm_configured:
            raise ConfigError("ENGINE=vllm needs VLLM_URL (a running vLLM started with --tokens-only) or "
                              "VLLM_PYTHON (the python of a venv with vLLM, which glm-serve then starts).")
        return "vllm", "ENGINE=vllm"
    if settings.engine == "llamacpp":
        return "llamacpp", "ENGINE=llamacpp"
    if vllm_configured:
        return "vllm", "ENGINE=auto and " + ("VLLM_URL" if settings.vllm_url else "VLLM_PYTHON") + " is set"
    path = resolve_model_path(settings.model_path)
    if path.endswith(".gguf") and _llamacpp_takes_lora(settings, path):
        from server.backends.llamacpp.launch import configured_binary

        if found := configured_binary(settings):
            return "llamacpp", f"ENGINE=auto, a .gguf model and llama.cpp from {found[1]}"
    return "native", "ENGINE=auto and no vLLM or llama.cpp is configured"


def _llamacpp_takes_lora(settings: Settings, gguf: str) -> bool:
    """No LORA_MODULES, or ones llama.cpp can load: GGUF adapter files, or peft adapters glm-serve converts for
    the model's architecture (chatglm, llama); others keep ENGINE=auto on the native engine, which serves any."""
    if not settings.lora_modules.strip():
        return True
    from server.backends.llamacpp.lora import convertible
    from server.backends.native.lora import parse_lora_modules

    paths = parse_lora_modules(settings.lora_modules).values()
    return all(p.endswith(".gguf") for p in paths) or convertible(gguf)


def build_chat(settings: Settings, metrics=None) -> ChatService:
    """Settings -> the serving layer over the chosen backend (slow: loads or starts the model)."""
    model_id = settings.served_model_name or derive_model_name(settings.model_path)
    lora = _lora_modules(settings, model_id)  # before the slow load: a typo should fail at once
    engine, why = engine_choice(settings)
    log.info("Engine: %s (%s)", engine, why)
    if engine == "vllm":
        from server.backends.vllm import build_vllm_backend
        from server.families.loading import load_family
        from server.model_files import model_folder

        folder = model_folder(resolve_model_path(settings.model_path), settings.cache_dir)
        family = load_family(folder)
        backend = build_vllm_backend(settings, model_folder=folder, adapters=lora, family=family)
    elif engine == "llamacpp":
        from server.backends.llamacpp import build_llamacpp_backend
        from server.families.loading import load_family

        backend, folder = build_llamacpp_backend(settings, model_path=resolve_model_path(settings.model_path),
                                                 adapters=lora)
        family = load_family(folder)
    else:
        backend = build_native_backend(settings, lora)
        family = backend.loaded.family
    return ChatService(family, backend, model_id=model_id, aliases=settings.alias_list,
                       request_timeout=settings.request_timeout, observer=metrics)


def build_native_backend(settings: Settings, lora: dict[str, str]):
    from server.backends.native.backend import NativeBackend
    from server.backends.native.device import place
    from server.backends.native.loader import load_chat_model

    path = resolve_model_path(settings.model_path)
    placement = place(settings.device, settings.dtype, settings.quantization, settings.quant_double, model_path=path)
    loaded = load_chat_model(path, placement, cache_dir=settings.cache_dir, max_model_len=settings.max_model_len)
    adapters: dict[str, str] = {}
    if lora:
        from server.backends.native.lora import attach_adapters

        loaded.model, adapters = attach_adapters(loaded.model, lora)
    return NativeBackend(loaded, adapters=adapters, max_running=settings.max_running_requests,
                         max_waiting=settings.max_waiting_requests, max_prefill_tokens=settings.max_prefill_tokens)


def _lora_modules(settings: Settings, model_id: str) -> dict[str, str]:
    if not settings.lora_modules.strip():
        return {}
    from server.backends.native.lora import AdapterError, parse_lora_modules

    lora = parse_lora_modules(settings.lora_modules)
    clash = sorted(set(lora) & {model_id, *settings.alias_list})
    if clash:
        raise AdapterError(f"LoRA adapter name(s) {', '.join(clash)} already name the base model (SERVED_MODEL_NAME "
                           "or MODEL_ALIASES); pick other names.")
    return lora


def build_embedder(settings: Settings, device: str, metrics=None):
    from server.embeddings import SentenceEmbedder

    path = resolve_embedding_path(settings.embedding_path)
    log.info("Loading embedding model %s on %s...", path, device)
    return SentenceEmbedder(path, model_id=settings.embedding_model_name or derive_model_name(settings.embedding_path),
                            device=device, observer=metrics)


def embedding_device(settings: Settings, chat: ChatService) -> str:
    """Beside the chat model's first layer on the native engine; DEVICE's pick when vLLM holds the model."""
    loaded = getattr(chat.backend, "loaded", None)
    if loaded is not None:
        return loaded.placement.input_device
    from server.backends.native.device import pick_device

    return pick_device(settings.device)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_summary(settings: Settings, chat: ChatService, embedder) -> str:
    aliases = f" (also: {', '.join(chat.aliases)})" if chat.aliases else ""
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    url = f"http://{host}:{settings.port}"
    lines = ["glm-serve is ready",
             f"  chat model   {chat.model_id}{aliases}  [{chat.family.name}]  from {settings.model_path}"]
    lines += [f"  {line}" for line in chat.backend.describe()]
    lines.append(f"  requests     timeout {settings.request_timeout:g} s, context {chat.context_length} tokens")
    if chat.adapters:
        lines.append(f"  LoRA         {', '.join(chat.adapters)}  (model ids on the shared base, unmerged)")
    if embedder is not None:
        lines.append(f"  embeddings   {embedder.model_id} ({embedder.dimensions} dims, max {embedder.max_seq_length} "
                     "tokens)")
    lines.append(f"  API          {url}/v1" + (f"   web chat {url}/" if settings.web_ui else ""))
    return "\n".join(lines)
