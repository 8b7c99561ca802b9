"""The memory planner against reality: ChatGLM3-6B's real config, random weights, loaded as the server loads it.

    .venv/bin/python -m bench.memory_plan --modes bf16,8bit,4bit --workdir /tmp/chatglm3-6b-random

Writes a random checkpoint in THUDM's original format once (12.5 GB of bfloat16 in --workdir, one shard per
layer, so it is never held in memory at once), then loads it in one subprocess per mode through
`load_chatglm3` (the server's road, fused qkv split included) so each mode's memory goes back to the OS. Per
mode it prints the planner's estimate, the measured weight bytes (bitsandbytes scales included), transformers'
`get_memory_footprint()`, the process's resident memory after a forward pass, load time and decode speed.

Too heavy for CI (minutes, GBs); it skips a mode when MemAvailable is too small for it, rather than push other
processes into the OOM killer. A bf16 checkpoint loaded in bf16 on CPU stays memory-mapped (page cache, which
the kernel can evict), so that mode is safe on a shared box; the quantized modes allocate only their result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/memory_plan.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.plan import PRECISIONS, gib, ram_memory, shape_from_config, weight_bytes  # noqa: E402

REAL_CONFIG = Path(__file__).resolve().parents[2] / "shared/fixtures/chatglm3/config.json"
MODES = {"fp32": PRECISIONS[0], "bf16": PRECISIONS[1], "8bit": PRECISIONS[2], "4bit-nodq": PRECISIONS[3],
         "4bit": PRECISIONS[4]}  # fmt: skip


def write_random_checkpoint(config_path: Path, out: Path) -> None:
    """THUDM-format tensors with ChatGLM3's names and shapes, uniform noise, one safetensors file per layer."""
    import torch
    from safetensors.torch import save_file

    if (out / "model.safetensors.index.json").exists():
        return
    c = json.loads(config_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    h, f, hd = c["hidden_size"], c["ffn_hidden_size"], c["kv_channels"]
    qkv = c["num_attention_heads"] * hd + 2 * c["multi_query_group_num"] * hd
    vocab, n = c["padded_vocab_size"], c["num_layers"]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.03, 0.03, generator=gen)

    shards: dict[str, dict] = {
        "embed": {"transformer.embedding.word_embeddings.weight": rand(vocab, h)},
        "head": {
            "transformer.output_layer.weight": rand(vocab, h),
            "transformer.encoder.final_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        },
    }
    index = {}
    for name in list(shards) + [f"layer{i}" for i in range(n)]:
        started = time.monotonic()
        if name.startswith("layer"):
            p = f"transformer.encoder.layers.{name[5:]}."
            tensors = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                       p + "self_attention.query_key_value.weight": rand(qkv, h),
                       p + "self_attention.query_key_value.bias": rand(qkv),
                       p + "self_attention.dense.weight": rand(h, c["num_attention_heads"] * hd),
                       p + "mlp.dense_h_to_4h.weight": rand(2 * f, h),
                       p + "mlp.dense_4h_to_h.weight": rand(h, f)}  # fmt: skip
        else:
            tensors = shards[name]
        file = f"model-{name}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, file))
        print(f"  wrote {file} ({time.monotonic() - started:.1f} s)", flush=True)
    (out / "config.json").write_text(json.dumps({**c, "torch_dtype": "bfloat16"}, indent=2))
    total = sum((out / f).stat().st_size for f in set(index.values()))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
    )


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def measure(mode: str, ckpt: Path, tokens: int) -> dict:
    """One load in this process (run in a subprocess by main)."""
    import torch
    import transformers

    from server.backends.native.device import place
    from server.families.chatglm3 import load_chatglm3
    from server.plan import measured_weight_bytes

    transformers.utils.logging.disable_progress_bar()
    torch.set_grad_enabled(False)
    p = MODES[mode]
    placement = place("cpu", "float32" if p.dtype_bytes == 4 else "bfloat16", p.quantization, p.double_quant)
    before = _status()
    started = time.monotonic()
    model = load_chatglm3(
        ckpt, dtype=placement.dtype, device_map=placement.device_map, quantization_config=placement.quantization_config
    )
    load_s = time.monotonic() - started
    ids = torch.tensor([[64790, 64792, 64795, 30910, 13, 36474, 64796]])  # [gMASK]sop<|user|>\n 你好<|assistant|>
    model(input_ids=ids)  # touch every weight once, so memory-mapped pages count as resident
    after = _status()
    started = time.monotonic()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    decode_s = (time.monotonic() - started) / tokens
    return {
        "mode": mode,
        "measured": measured_weight_bytes(model),
        "footprint": model.get_memory_footprint(),
        "rss": after["VmRSS"] - before["VmRSS"],
        "anon": after["RssAnon"] - before["RssAnon"],
        "file": after["RssFile"] - before["RssFile"],
        "load_s": load_s,
        "s_per_token": decode_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REAL_CONFIG, help="a ChatGLM3 config.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/chatglm3-6b-random"))
    parser.add_argument("--modes", default="bf16,8bit,4bit", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--tokens", type=int, default=4, help="greedy tokens timed per mode")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one mode, in a child process
    args = parser.parse_args(argv)
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure, args.workdir, args.tokens)), flush=True)
        return

    shape = shape_from_config(json.loads(args.config.read_text()))
    print(f"{args.config}: {shape.params:,} parameters; {shape.describe()}")
    print(f"Writing the random checkpoint to {args.workdir} (once)...", flush=True)
    write_random_checkpoint(args.config, args.workdir)
    rows = []
    for mode in args.modes.split(","):
        estimate = weight_bytes(shape, MODES[mode])
        # bf16 from a bf16 checkpoint stays memory-mapped (evictable page cache); the rest is allocated.
        need = 2 * 2**30 if mode == "bf16" else estimate + 2 * 2**30
        if ram_memory().free < need:
            print(f"{mode}: skipped, {gib(ram_memory().free)} available < {gib(need)} needed", flush=True)
            continue
        print(f"{mode}: loading (estimate {gib(estimate)})...", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "bench.memory_plan",
            "--measure",
            mode,
            "--workdir",
            str(args.workdir),
            "--tokens",
            str(args.tokens),
        ]
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
        )
        result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            print(f"{mode}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
            continue
        result["estimate"] = estimate
        rows.append(result)
        print(f"{mode}: {json.dumps(result)}", flush=True)
    print(
        "\n| mode | estimate | measured weights | get_memory_footprint() | RSS after load+forward "
        "(anon / file-backed) | load | decode |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {MODES[r['mode']].label} | {gib(r['estimate'])} | {gib(r['measured'])} "
            f"({100 * (r['estimate'] - r['measured']) / r['measured']:+.2f}%) | {gib(r['footprint'])} | "
            f"{gib(r['rss'])} ({gib(r['anon'])} / {gib(r['file'])}) | {r['load_s']:.0f} s | "
            f"{r['s_per_token']:.1f} s/token |"
        )


if __name__ == "__main__":
    main()
