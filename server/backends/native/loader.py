"""Load any supported chat checkpoint and pick its model family.

Three roads: a `.gguf` file (dequantized once, then cached as safetensors so restarts are fast),
a ChatGLM3 checkpoint (mapped natively onto transformers' GLM, no remote code), and any other
Hugging Face causal LM with a chat template.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.backends.native.device import Placement
from server.errors import EngineError

log = logging.getLogger("glm_serve.loader")


class ModelLoadError(EngineError):
    """The checkpoint cannot be served; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: Any
    family: Any
    context_length: int
    vocab_size: int
    placement: Placement
    weight_bytes: int
    load_seconds: float
    source: str


def read_config(path: str) -> dict:
    """config.json of a local folder or a hub repo (downloads only that small file)."""
    local = Path(path)
    if local.is_dir():
        cfg = local / "config.json"
        if not cfg.exists():
            raise ModelLoadError(f"{path} has no config.json: is it a Hugging Face model folder?")
        return json.loads(cfg.read_text(encoding="utf-8"))
    if local.suffix == ".gguf" or local.exists():
        raise ModelLoadError(f"{path} is a file but not a .gguf checkpoint.")
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "config.json")).read_text(encoding="utf-8"))
    except Exception as exc:
        raise ModelLoadError(
            f"Could not find model {path!r}: not a local folder, and fetching config.json from the "
            f"Hugging Face hub failed ({type(exc).__name__}). Check MODEL_PATH, your network or HF_ENDPOINT."
        ) from exc


def load_chat_model(path: str, placement: Placement, *, cache_dir: str, max_model_len: int = 0) -> LoadedModel:
    started = time.monotonic()
    log.info("Loading chat model %s (device %s, dtype %s)...", path, placement.describe(),
             str(placement.dtype).removeprefix("torch."))
    _quiet_bitsandbytes(placement)
    if path.endswith(".gguf"):
        model, family = _load_gguf(path, placement, Path(cache_dir))
        config = model.config.to_dict()
    else:
        config = read_config(path)
        from server.families.chatglm3 import is_chatglm_config

        if is_chatglm_config(config):
            model, family = _load_chatglm3(path, config, placement)
        else:
            model, family = _load_hf(path, placement)
    model.eval()
    weight_bytes = _weight_bytes(model, config, placement)
    context = _context_length(model.config)
    if max_model_len:
        context = min(context, max_model_len) if context else max_model_len
    return LoadedModel(
        model=model,
        family=family,
        context_length=context or 2048,
        vocab_size=int(model.config.vocab_size),
        placement=placement,
        weight_bytes=weight_bytes,
        load_seconds=time.monotonic() - started,
        source=path,
    )


def _load_hf(path: str, placement: Placement):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.families.chat_template import ChatTemplateFamily

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=placement.dtype,
        device_map=placement.device_map,
        quantization_config=placement.quantization_config,
    )
    return model, ChatTemplateFamily(tokenizer, _eos_ids(model))


def _load_chatglm3(path: str, config: dict, placement: Placement):
    from server.families.chatglm3 import ChatGLM3Family, ChatGLM3Tokenizer, check_chatglm3_config, load_chatglm3

    check_chatglm3_config(config)  # a clear refusal (v1, GLM-4...) before any file is fetched
    tokenizer = ChatGLM3Tokenizer.from_pretrained(path)
    model = load_chatglm3(
        path,
        dtype=placement.dtype,
        device_map=placement.device_map,
        quantization_config=placement.quantization_config,
    )
    return model, ChatGLM3Family(tokenizer)


def _load_gguf(path: str, placement: Placement, cache_root: Path):
    """transformers dequantizes GGUF tensors in Python (~15 s for 135M params); do that once per file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    gguf = Path(path)
    if not gguf.exists():
        raise ModelLoadError(f"GGUF file {path} does not exist.")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_root / f"{gguf.stem}-{key}"
    if not (cached / "config.json").exists():
        log.info("Converting %s once (dequantizing GGUF); the result is cached in %s", gguf.name, cached)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are plain tensors now; drop the GGUF marker so save_pretrained writes safetensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(cached)  # atomic: a half-written cache is never picked up
        del model
    else:
        log.info("Using the converted copy of %s in %s", gguf.name, cached)
    return _load_hf(str(cached), placement)


def _quiet_bitsandbytes(placement: Placement) -> None:
    qc = placement.quantization_config
    if qc is not None and getattr(qc, "load_in_8bit", False) and placement.dtype != torch.float16:
        # LLM.int8 multiplies in float16 and logs a warning about the cast in every layer at every step: say it once.
        bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
        if _drop_int8_cast_warning not in bnb_log.filters:
            bnb_log.addFilter(_drop_int8_cast_warning)
        log.info("8-bit layers compute in float16 (LLM.int8); %s activations are cast at each of them.",
                 str(placement.dtype).removeprefix("torch."))


def _drop_int8_cast_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _weight_bytes(model, config: dict, placement: Placement) -> int:
    """Measured weight memory (bitsandbytes scales included), logged next to the planner's estimate."""
    from server.plan import estimate_loaded, gib, measured_weight_bytes

    measured = measured_weight_bytes(model)
    estimate = estimate_loaded(config, placement)
    if estimate:
        log.info("Weights: plan estimated %s, measured %s (%+.1f%%)", gib(estimate), gib(measured),
                 100 * (estimate - measured) / measured)
    return measured


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _context_length(config) -> int:
    for name in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0
