"""Where a chat model's files are: config.json of a folder or hub repo, and GGUF files made into HF folders.

Shared by every engine (native loads the folder, vLLM is given it), the planner and the merge tool; no torch
here beyond what the one-time GGUF conversion needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from server.errors import EngineError

log = logging.getLogger("glm_serve.loader")


class ModelLoadError(EngineError):
    """The checkpoint cannot be served; the message says why and what to do."""


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


def context_length(folder: str, cap: int) -> int:
    """The model's own context (config.json of a local folder), capped by MAX_MODEL_LEN; 2048 if neither says."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    own = next((config[k] for k in ("max_position_embeddings", "seq_length") if isinstance(config.get(k), int)), 0)
    return min(own, cap) if own and cap else (own or cap or 2048)


def model_folder(path: str, cache_dir: str | os.PathLike[str]) -> str:
    """A folder (or hub id) any engine can load: a `.gguf` file is converted once to a cached HF folder."""
    return str(converted_gguf(Path(path), Path(cache_dir))) if path.endswith(".gguf") else path


def converted_gguf(gguf: Path, cache_root: Path) -> Path:
    """transformers dequantizes GGUF tensors in Python (~15 s for 135M params): do that once per file."""
    if not gguf.exists():
        raise ModelLoadError(f"GGUF file {gguf} does not exist.")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_root / f"{gguf.stem}-{key}"
    if (cached / "config.json").exists():
        log.info("Using the converted copy of %s in %s", gguf.name, cached)
        return cached
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    return cached
