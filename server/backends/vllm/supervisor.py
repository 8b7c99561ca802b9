"""Launch mode (VLLM_PYTHON): vLLM as our supervised child (server/backends/child/supervisor.py does the
supervising: process group, log, restart with backoff). Here: what the vLLM child is.

vLLM's output is streamed into our log at vLLM's own level, prefixed "vllm|"; its ~60 route lines at every start
and triton's ~50 leak-report lines at every exit go to debug.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

from server.backends.child.supervisor import MAX_RESTARTS, ChildSupervisor
from server.backends.vllm.adapters import VLLMAdapter
from server.backends.vllm.launch import VLLM_MODULE, VLLMInstall, probe_install, vllm_argv
from server.config import Settings

log = logging.getLogger("glm_serve.vllm")
child_log = logging.getLogger("glm_serve.vllm.child")

_EXIT_NOISE = re.compile(r"nanobind|^ - leaked |^ - \.\.\. skipped remainder|leaked \d+ (types|functions|instances)")
_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b \d\d-\d\d ")
# "(EngineCore pid=12) ERROR 12-02 05:48:05 [core.py:1510] " before a line of a traceback it logged
_LINE_PREFIX = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \S+ \[[^\]]*\] ?)?")
# A traceback's last line: "ValueError: ...", "pydantic_core._pydantic_core.ValidationError: 1 validation error ..."
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*([A-Z]\w*(?:Error|Exception))(?:: (.*))?$")
# What vLLM's API server raises when its engine core failed; the root cause is the exception printed before it.
_WRAPPER = re.compile(r"Engine core initialization failed|WorkerProc initialization failed|See root cause above")


class Supervisor(ChildSupervisor):
    label = "vLLM"
    tag = "vllm"
    timeout_setting = "VLLM_STARTUP_TIMEOUT"

    def __init__(self, settings: Settings, *, model_folder: str, served_name: str, adapters: list[VLLMAdapter],
                 max_restarts: int = MAX_RESTARTS, tokenizer: str | None = None):
        super().__init__(port=settings.vllm_port, startup_timeout=settings.vllm_startup_timeout, log=log,
                         child_log=child_log, max_restarts=max_restarts)
        self.settings = settings
        self.model_folder = model_folder
        self.served_name = served_name
        self.adapters = adapters
        self.tokenizer = tokenizer  # vLLM's --tokenizer (structured outputs); None: the model folder's
        self.install: VLLMInstall | None = None

    async def prepare(self) -> None:
        self.install = await asyncio.to_thread(probe_install, self.settings.vllm_python)

    def version(self) -> str:
        return self.install.version if self.install else ""

    def argv(self, port: int) -> list[str]:
        return vllm_argv(self.settings, self.install, model_folder=self.model_folder, served_name=self.served_name,
                         port=port, adapters=self.adapters, tokenizer=self.tokenizer)

    def line_level(self, line: str) -> int:
        if "Route:" in line or _EXIT_NOISE.search(line):
            return logging.DEBUG
        m = _LEVEL.search(line)
        return getattr(logging, m[1]) if m else logging.INFO

    hints = (
        (re.compile(r"max_model_len|max_seq_len|max-model-len"),
         "lower MAX_MODEL_LEN (or --max-model-len in VLLM_ARGS) to what the model and its KV cache hold, or give the "
         "KV cache more memory (VLLM_CPU_KVCACHE_SPACE in GiB on a CPU, GPU_MEMORY_UTILIZATION on a GPU)"),
        (re.compile(r"(?i)memory|can't allocate|KVCACHE"),
         "give vLLM less to allocate: a smaller VLLM_CPU_KVCACHE_SPACE (GiB, on a CPU) or GPU_MEMORY_UTILIZATION, a "
         "lower MAX_MODEL_LEN or MAX_RUNNING_REQUESTS, a smaller or quantized model, or fewer other processes here"),
        (re.compile(r"(?i)safetensor|deserializ|no such file|does not appear to have|not a valid|unrecognized "
                    r"(model|configuration)|config\.json|header|corrupt|incomplete"),
         "check MODEL_PATH: vLLM could not read the model there (a complete Hugging Face folder: config.json, the "
         "tokenizer and weights of an architecture vLLM supports)"),
        (re.compile(r"unrecognized arguments|error: argument|invalid choice"),
         f"fix VLLM_ARGS (the flags of python -m {VLLM_MODULE} --help)"),
    )

    def startup_cause(self, lines: list[str]) -> str:
        text = [_LINE_PREFIX.sub("", line).rstrip() for line in lines]
        found = [i for i, line in enumerate(text) if _EXCEPTION.match(line)]
        if not found:  # no traceback: argparse's "error: ...", or the last line it logged as an error
            errors = [t for t, line in zip(text, lines) if "error:" in t or self.line_level(line) >= logging.ERROR]
            return errors[-1].strip() if errors else ""
        first = next((i for i in found if not _WRAPPER.search(text[i])), found[-1])
        m = _EXCEPTION.match(text[first])
        cause = f"{m[1]}: {m[2]}" if m[2] else m[1]
        # pydantic puts the reason on the indented lines under "1 validation error for ModelConfig"
        if "validation error" not in cause:
            return cause
        detail = [t.strip() for t in text[first + 1:first + 4] if t.startswith(" ") and "errors.pydantic" not in t]
        return re.sub(r" \[type=.*$", "", " ".join([cause, *detail[:2]]))

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")  # its log lines as they happen, not in 8 KiB blocks
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        return env
