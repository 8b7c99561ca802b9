"""Load any supported chat checkpoint and pick its model family.

Three roads: a `.gguf` file (dequantized once, then cached as safetensors so restarts are fast, see
server/model_files.py), a ChatGLM3 checkpoint (mapped natively onto transformers' GLM, no remote code), and any
other Hugging Face causal LM with a chat template. The family (tokenizer, prompt rules) comes from
server/families/loading.py, as it does for every engine.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from server.backends.native.device import Placement
from server.families.loading import load_family
from server.model_files import model_folder, read_config

log = logging.getLogger("glm_serve.loader")


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


def load_chat_model(path: str, placement: Placement, *, cache_dir: str, max_model_len: int = 0) -> LoadedModel:
    started = time.monotonic()
    log.info("Loading chat model %s (device %s, dtype %s)...", path, placement.describe(),
             str(placement.dtype).removeprefix("torch."))
    _quiet_bitsandbytes(placement)
    folder = model_folder(path, cache_dir)
    config = read_config(folder)
    family = load_family(folder, config)
    if family.name == "chatglm3":
        from server.families.chatglm3 import load_chatglm3

        model = load_chatglm3(folder, dtype=placement.dtype, device_map=placement.device_map,
                              quantization_config=placement.quantization_config)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=placement.dtype, device_map=placement.device_map,
                                                     quantization_config=placement.quantization_config)
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


def _quiet_bitsandbytes(placement: Placement) -> None:
    qc = placement.quantization_config
    if qc is not None and getattr(qc, "load_in_8bit", False) and placement.dtype != torch.float16:
        # LLM.int8 multiplies in float16 and warns about the cast (warnings.warn up to bitsandbytes 0.48, the
        # pin's top) in every layer at every step: say it once.
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast", category=UserWarning)
        log.info("8-bit layers compute in float16 (LLM.int8); %s activations are cast at each of them.",
                 str(placement.dtype).removeprefix("torch."))


def _weight_bytes(model, config: dict, placement: Placement) -> int:
    """Measured weight memory (bitsandbytes scales included), logged next to the planner's estimate."""
    from server.plan import estimate_loaded, gib, measured_weight_bytes

    measured = measured_weight_bytes(model)
    estimate = estimate_loaded(config, placement)
    if estimate:
        log.info("Weights: plan estimated %s, measured %s (%+.1f%%)", gib(estimate), gib(measured),
                 100 * (estimate - measured) / measured)
    return measured


def _context_length(config) -> int:
    for name in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0
