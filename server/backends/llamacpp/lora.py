"""LoRA adapters on llama.cpp: each peft adapter of LORA_MODULES as a GGUF LoRA file, converted once into CACHE_DIR.

llama.cpp applies LoRA only from GGUF adapter files, as its convert_lora_to_gguf.py writes them: general.type
adapter, adapter.type lora, adapter.lora.alpha, and per base tensor `<its GGUF name>.lora_a` ([r, in]) and
`.lora_b` ([out, r]), added to that tensor's matmul. So an adapter's modules take the base conversion's names and
layout:
- chatglm (ChatGLM3 through python -m server.convert): q/k/v stay one fused attn_qkv. An adapter in ChatGLM3's
  names maps as it is; one on GLM's (q_proj, k_proj, v_proj, ...) is fused exactly as for vLLM (A stacked, B block
  diagonal: vllm/adapters.py, over the one name table server/families/chatglm3/names.py), then named by
  server.convert's tensor_name.
- llama (llama.cpp's convert_hf_to_gguf.py): the base's q_proj/k_proj rows are permuted into llama.cpp's rotary
  layout; B's rows (the output side) take the same permutation and A stays, which is exact (row i of B @ A depends
  on row i of B only).
Each module's peft scale (alpha/r, rsLoRA, rank and alpha patterns) is folded into B and every module zero-padded
to one rank R, with alpha = R: llama.cpp's alpha/rank is then exactly 1 for each module (vllm/adapters.one_rank).
A .gguf path in LORA_MODULES is taken as a llama.cpp adapter already; its architecture must be the model's.

`python -m server.backends.llamacpp.export_lora BASE.gguf ADAPTER OUT.gguf` writes one for a llama.cpp of your own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from server.backends.llamacpp.wire import gguf_metadata
from server.errors import ConfigError

log = logging.getLogger("glm_serve.llamacpp")

CONVERTED_ARCHS = ("chatglm", "llama")  # base architectures glm-serve converts peft adapters for
_FORMAT = "v1"  # bump when the conversion changes, so stale cached copies are not reused
_PEFT_PREFIX = "base_model.model."


@dataclass
class LlamaAdapter:
    name: str  # the served model id
    path: str  # the GGUF adapter llama-server loads (--lora), in LORA_MODULES order: its id there is its index
    converted: bool = False


@dataclass
class BaseShape:
    """What an adapter's conversion needs of the base GGUF."""

    arch: str
    layers: int
    heads: int
    kv_heads: int
    hidden: int

    def key(self) -> str:
        return f"{self.arch}:{self.layers}:{self.heads}:{self.kv_heads}:{self.hidden}"


def base_shape(gguf: str) -> BaseShape:
    arch = gguf_metadata(gguf, ("general.architecture",)).get("general.architecture", "")
    keys = tuple(f"{arch}.{k}" for k in ("block_count", "attention.head_count", "attention.head_count_kv",
                                          "embedding_length"))
    meta = gguf_metadata(gguf, keys)
    heads = meta.get(keys[1], 0)
    kv = meta.get(keys[2], heads)
    if isinstance(heads, list) or isinstance(kv, list):  # per-layer head counts: no arch we convert for has them
        heads = kv = 0
    return BaseShape(arch, int(meta.get(keys[0], 0)), int(heads), int(kv), int(meta.get(keys[3], 0)))


def convertible(gguf: str) -> bool:
    """Whether glm-serve converts peft adapters for this base GGUF (ENGINE=auto's question for LORA_MODULES)."""
    try:
        return base_shape(gguf).arch in CONVERTED_ARCHS
    except (OSError, ValueError, KeyError):
        return False


def gguf_adapters(adapters: dict[str, str], *, base_gguf: str, cache_dir: str) -> list[LlamaAdapter]:
    """LORA_MODULES {name: path} -> the GGUF adapter files llama-server loads, converting what is a peft folder."""
    if not adapters:
        return []
    shape = base_shape(base_gguf)
    out = []
    for name, path in adapters.items():
        if path.endswith(".gguf"):
            out.append(LlamaAdapter(name, _checked_gguf(name, path, shape)))
            continue
        folder = Path(path).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(f"LoRA adapter {name!r}: {path} has no adapter_config.json (glm-serve on llama.cpp "
                              "needs a local peft LoRA folder, or a GGUF LoRA adapter file).")
        if shape.arch not in CONVERTED_ARCHS:
            raise ConfigError(
                f"LoRA adapter {name!r}: glm-serve converts peft adapters for llama.cpp on "
                f"{' and '.join(CONVERTED_ARCHS)} models, and {base_gguf} is {shape.arch!r}: convert it with "
                "llama.cpp's convert_lora_to_gguf.py and name the .gguf file in LORA_MODULES, or serve it with "
                "ENGINE=native.")
        out.append(LlamaAdapter(name, str(_cached(name, folder, shape, Path(cache_dir).expanduser())), True))
    return out


def _checked_gguf(name: str, path: str, shape: BaseShape) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"LoRA adapter {name!r}: {path} does not exist.")
    meta = gguf_metadata(path, ("general.type", "general.architecture"))
    if meta.get("general.type") != "adapter":
        raise ConfigError(f"LoRA adapter {name!r}: {path} is a GGUF model, not a LoRA adapter (general.type "
                          f"{meta.get('general.type')!r}).")
    if meta.get("general.architecture") != shape.arch:
        raise ConfigError(f"LoRA adapter {name!r}: {path} is for {meta.get('general.architecture')!r} models, the "
                          f"model is {shape.arch!r}.")
    return path


def _cached(name: str, folder: Path, shape: BaseShape, cache: Path) -> Path:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{_FORMAT}|{shape.key()}|{stamp}".encode()).hexdigest()[:16]
    out = cache / "llamacpp-lora" / f"{re.sub(r'[^0-9A-Za-z_.-]', '_', name)}-{key}.gguf"
    if out.exists():
        log.info("LoRA adapter %s: using its GGUF copy for llama.cpp in %s", name, out)
        return out
    tensors, rank = adapter_tensors(name, folder, shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf_adapter(out, shape.arch, tensors, alpha=float(rank))
    log.info("LoRA adapter %s: converted once to a GGUF adapter for llama.cpp (%d weights, rank %d): %s", name,
             len(tensors), rank, out)
    return out


def adapter_tensors(name: str, folder: Path, shape: BaseShape) -> tuple[dict[str, tuple], int]:
    """({GGUF base tensor name: (A, B)}, rank) of a peft adapter folder, in float32, scales folded (module doc)."""
    from server.backends.vllm.adapters import load_adapter_weights, read_json

    config = read_json(folder / "adapter_config.json")
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"LoRA adapter {name!r} is a {config.get('peft_type')} adapter; only LoRA is served.")
    weights = load_adapter_weights(folder, name)
    if shape.arch == "chatglm":
        return _chatglm(name, weights, config, shape)
    return _llama(name, weights, config, shape)


def _chatglm(name: str, weights: dict, config: dict, shape: BaseShape):
    from server.backends.vllm.adapters import translate_glm_adapter
    from server.convert import tensor_name

    base = {"kv_channels": shape.hidden // shape.heads, "num_attention_heads": shape.heads,
            "multi_query_attention": True, "multi_query_group_num": shape.kv_heads}
    tensors, new = translate_glm_adapter(weights, config, base, adapter=name, engine="llama.cpp")
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[_mapped(name, module, lambda m: tensor_name(m + ".weight", shape.layers))] = (
                a, tensors[module + ".lora_B.weight"])
    return out, int(new["r"])


def _llama(name: str, weights: dict, config: dict, shape: BaseShape):
    import gguf

    from server.backends.vllm.adapters import one_rank, scaled_lora_pairs

    def refuse(why: str):
        return ConfigError(f"LoRA adapter {name!r} cannot be served on llama.cpp's {shape.arch}: {why}")

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.layers)
    modules = {}
    for module, (a, b) in scaled_lora_pairs(weights, config, refuse, engine="llama.cpp").items():
        if module.endswith(".q_proj"):
            b = _permute(b, shape.heads)
        elif module.endswith(".k_proj"):
            b = _permute(b, shape.kv_heads)
        modules[_mapped(name, module, lambda m: names.get_name(m + ".weight", try_suffixes=(".weight",)))] = (a, b)
    return one_rank(modules)


def _permute(b, n: int):
    """convert_hf_to_gguf's LlamaModel.permute on B's rows, over the n heads of q (or of k): each head's two rotary
    halves interleaved."""
    return b.reshape(n, 2, b.shape[0] // n // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape).contiguous()


def _mapped(adapter: str, module: str, name_of) -> str:
    bare = module.removeprefix(_PEFT_PREFIX)
    try:
        mapped = name_of(bare)
    except ValueError:
        mapped = None
    if mapped is None:
        raise ConfigError(f"LoRA adapter {adapter!r}: its module {bare} is no weight of the model's GGUF (was it "
                          "trained on another model?).")
    return mapped


def write_gguf_adapter(out: Path, arch: str, tensors: dict[str, tuple], *, alpha: float) -> Path:
    """A GGUF LoRA adapter as convert_lora_to_gguf.py writes one (float32 tensors), atomically."""
    import gguf

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for base, (a, b) in tensors.items():
        writer.add_tensor(base + ".lora_a", a.float().numpy())
        writer.add_tensor(base + ".lora_b", b.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)  # a half-written file is never picked up
    return out

