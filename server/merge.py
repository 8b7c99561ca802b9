"""python -m server.merge BASE ADAPTER OUT: bake a LoRA adapter into its base model, for serving like any model.

BASE is anything MODEL_PATH accepts (hub id, folder, .gguf); it loads through the server's own loader, so a
ChatGLM3 base and a ChatGLM3-named adapter are handled as the server handles them. The merged folder is:
  - for a ChatGLM3 base: a ChatGLM3 checkpoint in THUDM's original format (model_type chatglm, fused
    query_key_value, its tokenizer.model), so the server loads it through the ChatGLM3 family as it loads
    THUDM/chatglm3-6b, THUDM's own code can load it too, and ChatGLM3 adapters still apply to it;
  - otherwise: a Hugging Face checkpoint (save_pretrained) with the base's tokenizer and chat template.
Merging is done unquantized (bitsandbytes weights cannot take a merge without loss); --dtype sets the precision.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from server.backends.native.device import Placement
from server.config import Settings, resolve_model_path
from server.errors import EngineError
from server.families.chatglm3.names import FUSED_QKV, SPLIT_QKV, to_chatglm

log = logging.getLogger("glm_serve.merge")

DTYPES = ("auto", "float16", "bfloat16", "float32")
CHATGLM3_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


class MergeError(EngineError):
    pass


def merge(base: str, adapter: str, out: str | Path, *, dtype: str = "auto", device: str = "cpu",
          cache_dir: str | None = None) -> Path:
    from server.backends.native.loader import load_chat_model
    from server.backends.native.lora import attach_adapters
    from server.plan import gib, measured_weight_bytes

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"{out} exists and is not empty; give a new folder (nothing was written).")
    path = resolve_model_path(base)
    dt = _dtype(dtype, path)
    started = time.monotonic()
    log.info("Loading base model %s in %s on %s...", path, str(dt).removeprefix("torch."), device)
    cache_dir = cache_dir or os.environ.get("CACHE_DIR") or Settings.model_fields["cache_dir"].default
    loaded = load_chat_model(path, Placement(device, dt, {"": device}), cache_dir=cache_dir)
    log.info("Applying LoRA adapter %s...", adapter)
    peft_model, _ = attach_adapters(loaded.model, {Path(adapter.rstrip("/")).name or "adapter": adapter})
    log.info("Merging (W += scale * B @ A in every adapted layer)...")
    merged = peft_model.merge_and_unload()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if loaded.family.name == "chatglm3":
        _save_chatglm3(merged, path, loaded.family.tokenizer, partial, dt)
    else:
        merged.save_pretrained(partial)
        loaded.family.tokenizer.save_pretrained(partial)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # empty (checked above)
    partial.rename(out)  # whole or nothing: a half-written folder never looks like a checkpoint
    kind = "ChatGLM3 checkpoint, THUDM format" if loaded.family.name == "chatglm3" else "Hugging Face checkpoint"
    log.info("Wrote %s (%s, %s of weights) in %.0f s. Serve it with: MODEL_PATH=%s python -m server",
             out, kind, gib(measured_weight_bytes(merged)), time.monotonic() - started, out)
    return out


def _dtype(name: str, path: str) -> torch.dtype:
    """auto: the checkpoint's own dtype (float16 for ChatGLM3), so the merged copy is the size of the original."""
    if name != "auto":
        return getattr(torch, name)
    if not path.endswith(".gguf"):
        from server.model_files import read_config

        config = read_config(path)
        saved = config.get("torch_dtype") or config.get("dtype")
        if saved in DTYPES[1:]:
            return getattr(torch, saved)
    return torch.bfloat16


def chatglm3_state_dict(glm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GLM names -> ChatGLM3 names; q/k/v (weight and bias) concatenated back into query_key_value."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in glm_state.items():
        q, k, v = (f".{p}." for p in SPLIT_QKV)
        if k in key or v in key:
            continue  # joined with q_proj below
        if q in key:
            tensor = torch.cat([glm_state[key.replace(q, p)] for p in (q, k, v)])
            key = key.replace(q, f".{FUSED_QKV}.")
        key = to_chatglm(key)
        if not key.startswith("transformer."):
            raise MergeError(f"Unexpected tensor {key} in the merged GLM model; not writing a ChatGLM3 checkpoint.")
        out[key] = tensor.contiguous()
    return out


def _save_chatglm3(model, base_path: str, tokenizer, out: Path, dtype: torch.dtype) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from server.model_files import read_config

    state = chatglm3_state_dict(model.state_dict())
    out.mkdir(parents=True)
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size="5GB")
    for i, (filename, names) in enumerate(split.filename_to_tensors.items(), 1):
        log.info("Writing %s (%d/%d)...", filename, i, len(split.filename_to_tensors))
        save_file({n: state[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {**read_config(base_path), "torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    shutil.copyfile(tokenizer.model_file, out / "tokenizer.model")
    for name in CHATGLM3_FILES:
        src = _base_file(base_path, name)
        if src is not None:
            shutil.copyfile(src, out / name)


def _base_file(base_path: str, name: str) -> Path | None:
    local = Path(base_path)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(base_path, name))
    except Exception:  # optional files: the hub repo may not have them
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="base model: hub id, local folder or .gguf (as MODEL_PATH)")
    parser.add_argument("adapter", help="LoRA adapter folder or hub id (with adapter_config.json)")
    parser.add_argument("out", help="new folder for the merged checkpoint")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="precision of the merged weights "
                        "(auto: the base checkpoint's own)")
    parser.add_argument("--device", default="cpu", help="where to merge: cpu (default) or cuda:N (faster)")
    parser.add_argument("--cache-dir", default=None, help="where converted GGUF copies live (as CACHE_DIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        merge(args.base, args.adapter, args.out, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
    except EngineError as exc:
        sys.exit(f"merge failed: {exc.message}")


if __name__ == "__main__":
    main()
