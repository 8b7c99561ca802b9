"""llama-server as our supervised child (server/backends/child/supervisor.py does the supervising: process group,
log, restart with backoff). Here: what the child is, and which of its log lines are worth an INFO line.

Run with --log-prefix, every line starts with its level letter (I, W, E, D). The per-request lines (each slot's
task start, timings and release, each HTTP request including our 2 s health poll) go to debug.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets

from server.backends.child.supervisor import MAX_RESTARTS, ChildSupervisor
from server.backends.llamacpp.launch import LlamaInstall, llama_argv, probe_install
from server.config import Settings

log = logging.getLogger("glm_serve.llamacpp")
child_log = logging.getLogger("glm_serve.llamacpp.child")

_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "D": logging.DEBUG}
_PREFIX = re.compile(r"^(?:\d+\.\d+\.\d+\.\d+ )?([IWED]) (.*)$")
_CHATTER = re.compile(r"^slot |log_server_r|update_slots|params_from_|all slots are idle|prompt cache|"
                      r"get_availabl|launch_slot|print_timing|release: |cache_reuse|selected slot")


class LlamaSupervisor(ChildSupervisor):
    label = "llama.cpp"
    tag = "llama.cpp"
    timeout_setting = "LLAMACPP_STARTUP_TIMEOUT"

    def __init__(self, settings: Settings, *, gguf: str, served_name: str, context: int,
                 max_restarts: int = MAX_RESTARTS, loras: tuple[str, ...] = ()):
        super().__init__(port=0, startup_timeout=settings.llamacpp_startup_timeout, log=log, child_log=child_log,
                         max_restarts=max_restarts)
        self.settings = settings
        self.gguf = gguf
        self.served_name = served_name
        self.context = context
        self.loras = loras
        self.install: LlamaInstall | None = None
        self.api_key = secrets.token_urlsafe(24)

    async def prepare(self) -> None:
        self.install = await asyncio.to_thread(probe_install, self.settings)

    def version(self) -> str:
        return f"build {self.install.version}" if self.install else ""

    def argv(self, port: int) -> list[str]:
        return llama_argv(self.settings, self.install, gguf=self.gguf, served_name=self.served_name, port=port,
                          context=self.context, api_key=self.api_key, loras=self.loras)

    def shown(self, argv: list[str]) -> list[str]:
        return ["***" if a == self.api_key else a for a in argv]

    hints = (
        (re.compile(r"(?i)insufficient memory|failed to allocate|out of memory|create_?context|kv cache"),
         "give llama.cpp a smaller KV cache to allocate: a lower MAX_MODEL_LEN (its --ctx-size, which LLAMACPP_ARGS "
         "may also set), a quantized cache (LLAMACPP_ARGS=\"--cache-type-k q8_0 --cache-type-v q8_0\") or a smaller "
         "GGUF"),
        (re.compile(r"(?i)load(ing)? model|gguf|magic|corrupt"),
         "check the GGUF (LLAMACPP_GGUF, or MODEL_PATH when it is a .gguf): llama.cpp could not load it (a truncated "
         "or damaged file, or an architecture this llama.cpp build does not know)"),
        (re.compile(r"(?i)invalid argument|unknown argument|error: "), "fix LLAMACPP_ARGS (llama-server --help)"),
    )

    def startup_cause(self, lines: list[str]) -> str:
        """Its first error line (the most specific) and the one that names what failed to load."""
        errors = [" ".join(m[2].split()) for m in map(_PREFIX.match, lines) if m and m[1] == "E"]
        if not errors:  # e.g. an unknown flag is reported before logging starts, without a level letter
            return next((line.strip() for line in reversed(lines) if "error" in line.lower()), "")
        failed = next((e for e in reversed(errors) if "load_model:" in e), errors[-1])
        return errors[0] if failed == errors[0] else f"{errors[0]}; {failed}"

    def line_level(self, line: str) -> int:
        m = _PREFIX.match(line)
        if not m:
            return logging.INFO
        level = _LEVELS[m[1]]
        if level == logging.WARNING and "cancel task" in m[2]:
            return logging.DEBUG  # a stream we closed (a stop id, max_tokens, a client gone): our normal abort
        return logging.DEBUG if level == logging.INFO and _CHATTER.search(m[2]) else level
