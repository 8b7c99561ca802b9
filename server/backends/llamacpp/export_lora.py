"""python -m server.backends.llamacpp.export_lora BASE.gguf ADAPTER OUT.gguf: a peft LoRA adapter as a GGUF LoRA
adapter for a llama.cpp you run yourself (`llama-server --lora OUT.gguf`), converted as glm-serve converts
LORA_MODULES for ENGINE=llamacpp (lora.py). BASE is the model's GGUF: chatglm (python -m server.convert) or llama.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from server.backends.llamacpp.lora import CONVERTED_ARCHS, adapter_tensors, base_shape, write_gguf_adapter


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m server.backends.llamacpp.export_lora",
                                 description="A peft LoRA adapter as a GGUF LoRA adapter for llama.cpp (--lora).")
    ap.add_argument("base", help="the model's GGUF (chatglm from python -m server.convert, or a llama-arch GGUF)")
    ap.add_argument("adapter", type=Path, help="a peft LoRA adapter folder (adapter_config.json + weights)")
    ap.add_argument("out", type=Path, help="the .gguf adapter file to write")
    args = ap.parse_args(argv)
    shape = base_shape(args.base)
    if shape.arch not in CONVERTED_ARCHS:
        raise SystemExit(f"{args.base} is {shape.arch!r}; this converts for {', '.join(CONVERTED_ARCHS)} only.")
    tensors, rank = adapter_tensors(args.adapter.name, args.adapter, shape)
    write_gguf_adapter(args.out, shape.arch, tensors, alpha=float(rank))
    print(f"wrote {args.out} ({len(tensors)} weights, rank {rank}, {shape.arch})")


if __name__ == "__main__":
    main()
