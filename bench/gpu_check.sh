#!/usr/bin/env bash
# The prepared GPU check for the `device` tool (a bare H200: torch 2.11 CUDA, transformers 5.17, peft, accelerate;
# no FastAPI, no network, 64 MiB of carried files, 15 minutes a session). Two steps:
#
#   here:    bash bench/gpu_check.sh fetch      # the small wheels the server needs into bench/gpu_wheels (< 64 MiB)
#   device:  run(command="bash bench/gpu_check.sh run", carry=["bench/gpu_wheels"], timeout_s=540)
#
# `run` installs the wheels with --no-deps, writes a random ChatGLM3-6B-shaped checkpoint (the real config) on the
# GPU, starts the real server on it in bf16 (then 8-bit and 4-bit if bitsandbytes imports) and measures it through
# the HTTP API with bench.serve at c=1/16/64; results land in $OUT. vLLM cannot be carried there (its wheel alone
# is far over 64 MiB): GPU vLLM is the compose recipe in deploy/, untested here.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/gpu_wheels
# transformers >= 5.24 (the `cache` argument of forward); the rest are what the device image lacks.
PACKAGES=(transformers==5.24.0 tokenizers fastapi starlette uvicorn h11 sse-starlette pydantic-settings python-dotenv
          prometheus-client pyjwt orjson openai zhipuai httpx httpcore anyio sniffio distro jiter gguf sentencepiece
          annotated-types typing-inspection safetensors huggingface-hub)

case "${1:-}" in
fetch)
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
  # The real 6B config and tokenizer (../shared is not carried; this folder is ignored by git, never committed).
  mkdir -p "$WHEELS/fixture" && cp ../shared/fixtures/chatglm3/{config.json,tokenizer.model,tokenizer_config.json} \
    "$WHEELS/fixture/"
  du -sh "$WHEELS"
  ;;
run)
  OUT=${OUT:-/tmp/gpu-check}
  mkdir -p "$OUT"
  python -m pip install -q --no-deps --no-index "$WHEELS"/*.whl
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.get_device_name(0),
    'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
  MODEL=/tmp/chatglm3-6b-random
  python - "$MODEL" <<'PY'
import json, shutil, sys, torch
from pathlib import Path
from safetensors.torch import save_file
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
    shutil.copy(Path("bench/gpu_wheels/fixture") / f, out / f)
cfg = json.loads((out / "config.json").read_text())
from server.families.chatglm3.weights import chatglm_config_to_glm
from transformers import GlmForCausalLM
torch.manual_seed(0)
with torch.device("cuda"):
    model = GlmForCausalLM(chatglm_config_to_glm(cfg)).to(torch.bfloat16)
from server.merge import chatglm3_state_dict
state = chatglm3_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
print("wrote", out, sum(v.numel() for v in state.values()) / 1e9, "B params")
PY
  for quant in none 8bit 4bit; do
    if [ "$quant" != none ] && ! python -c "import bitsandbytes" 2>/dev/null; then echo "no bitsandbytes: $quant skipped"; continue; fi
    MODEL_PATH=$MODEL QUANTIZATION=$quant DTYPE=bfloat16 EMBEDDING_PATH=none WEB_UI=false MAX_RUNNING_REQUESTS=64 \
      MAX_WAITING_REQUESTS=256 SERVED_MODEL_NAME=chatglm3-6b python -m server --port 6006 > "$OUT/server-$quant.log" 2>&1 &
    pid=$!
    for _ in $(seq 300); do curl -sf localhost:6006/health >/dev/null && break; sleep 1; done
    python -m bench.serve --base-url http://127.0.0.1:6006/v1 --model chatglm3-6b --max-concurrency 1,16,64 \
      --num-prompts 4,32,128 --input-len 100 --output-len 64 --label "native-$quant" --disable-tqdm \
      --result-json "$OUT/native-$quant.json" || true
    kill $pid; wait $pid || true
  done
  ;;
*)
  echo "usage: bash bench/gpu_check.sh fetch|run" >&2; exit 2 ;;
esac
