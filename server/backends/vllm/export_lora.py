"""python -m server.backends.vllm.export_lora BASE ADAPTER OUT: a GLM-named LoRA adapter for a vLLM you run.

In launch mode (VLLM_PYTHON) glm-serve translates such adapters itself; a vLLM reached through VLLM_URL loads
adapter files on its own, so give it this translated copy (`--lora-modules NAME=OUT`). BASE is the ChatGLM3 model
folder (its config.json gives the q/k/v sizes). Adapters already in ChatGLM3's names need nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from server.backends.vllm.adapters import load_adapter_weights, read_json, translate_glm_adapter, write_adapter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.backends.vllm.export_lora", description=__doc__.split(
        "\n")[0].split(": ", 1)[1])
    parser.add_argument("base", type=Path, help="the ChatGLM3 model folder (THUDM format)")
    parser.add_argument("adapter", type=Path, help="a peft LoRA folder trained on GLM module names (q_proj, ...)")
    parser.add_argument("out", type=Path, help="where to write the adapter in ChatGLM3 names")
    args = parser.parse_args(argv)
    base, config = read_json(args.base / "config.json"), read_json(args.adapter / "adapter_config.json")
    tensors, new_config = translate_glm_adapter(load_adapter_weights(args.adapter, args.adapter.name), config, base,
                                                adapter=args.adapter.name)
    write_adapter(tensors, new_config, args.out)
    print(f"{args.out}: rank {new_config['r']}, modules {', '.join(new_config['target_modules'])}")


if __name__ == "__main__":
    main()
