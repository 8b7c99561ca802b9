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

log = logging.getLogger("glm_serve")


def build_engine(settings: Settings, metrics=None, *, logits_hook=None):
    from server.backends.native.device import place
    from server.backends.native.loader import load_chat_model
    from server.serving.engine import LocalChatEngine

    model_id = settings.served_model_name or derive_model_name(settings.model_path)
    lora = _lora_modules(settings, model_id)  # before the slow load: a typo should fail at once
    placement = place(settings.device, _dtype(settings), settings.quantization, settings.quant_double)
    loaded = load_chat_model(resolve_model_path(settings.model_path), placement, cache_dir=settings.cache_dir,
                             max_model_len=settings.max_model_len)
    adapters: dict[str, str] = {}
    if lora:
        from server.backends.native.lora import attach_adapters

        loaded.model, adapters = attach_adapters(loaded.model, lora)
    return LocalChatEngine(
        loaded,
        model_id=model_id,
        aliases=settings.alias_list,
        adapters=adapters,
        max_running=settings.max_running_requests,
        max_waiting=settings.max_waiting_requests,
        max_prefill_tokens=settings.max_prefill_tokens,
        request_timeout=settings.request_timeout,
        logits_hook=logits_hook,
        observer=metrics,
    )


def _dtype(settings: Settings) -> str:
    from server.backends.native.device import cpu_auto_dtype, pick_device

    if settings.dtype != "auto" or settings.quantization != "none" or pick_device(settings.device) != "cpu":
        return settings.dtype
    from server.plan import PRECISIONS, ram_memory, read_shape, weight_bytes

    try:
        fp32 = weight_bytes(read_shape(resolve_model_path(settings.model_path)), PRECISIONS[0])
    except Exception:  # an unknown shape: the loader will say what is wrong; bf16 is the safe guess meanwhile
        fp32 = None
    return cpu_auto_dtype(fp32, ram_memory().free)


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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_summary(settings: Settings, engine, embedder) -> str:
    loaded = engine.loaded
    p = loaded.placement
    aliases = f" (also: {', '.join(engine.aliases)})" if engine.aliases else ""
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    url = f"http://{host}:{settings.port}"
    lines = [
        "glm-serve is ready",
        f"  chat model   {engine.model_id}{aliases}  [{loaded.family.name}]  from {loaded.source}",
        f"  device       {p.describe()}   dtype {str(p.dtype).removeprefix('torch.')}"
        + (f"   quantization {settings.quantization}" if settings.quantization != "none" else ""),
        f"  weights      {loaded.weight_bytes / 2**20:,.0f} MiB   context {loaded.context_length} tokens"
        f"   loaded in {loaded.load_seconds:.1f} s",
        f"  batching     {settings.max_running_requests} running, {settings.max_waiting_requests} waiting, "
        f"prefill chunks {settings.max_prefill_tokens or 'off'}, timeout {settings.request_timeout:g} s",
    ]
    if engine.adapters:
        lines.append(f"  LoRA         {', '.join(engine.adapters)}  (model ids on the shared base, unmerged)")
    if embedder is not None:
        lines.append(f"  embeddings   {embedder.model_id} ({embedder.dimensions} dims, max {embedder.max_seq_length} "
                     "tokens)")
    lines.append(f"  API          {url}/v1" + (f"   web chat {url}/" if settings.web_ui else ""))
    return "\n".join(lines)
