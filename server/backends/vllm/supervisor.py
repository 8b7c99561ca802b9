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
from server.backends.vllm.launch import VLLMInstall, probe_install, vllm_argv
from server.config import Settings

log = logging.getLogger("glm_serve.vllm")
child_log = logging.getLogger("glm_serve.vllm.child")

_EXIT_NOISE = re.compile(r"nanobind|^ - leaked |^ - \.\.\. skipped remainder|leaked \d+ (types|functions|instances)")
_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b \d\d-\d\d ")


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

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")  # its log lines as they happen, not in 8 KiB blocks
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        return env
