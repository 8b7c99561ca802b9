"""Launch mode (VLLM_PYTHON): vLLM as our child process, started, watched, restarted and stopped by us.

- Its own process group (vLLM forks an engine core and workers): stopping or cleaning up signals the whole group,
  so no orphan keeps the port, the memory or the GPU. That matters: when only vLLM's API server dies, its engine
  core and worker stay alive and spin on the CPU (seen here: 1.1 cores for 11 minutes). If we exit without
  stop(), an atexit hook kills the group; if we are SIGKILLed, the child gets SIGTERM from the kernel
  (PR_SET_PDEATHSIG, Linux) and takes its own children down.
- Its output goes to our log line by line, prefixed "vllm|", at vLLM's own level; the last lines are kept, so a
  failed start-up says why in vLLM's words.
- Ready = GET /health answers 200 within VLLM_STARTUP_TIMEOUT; exiting first fails start-up.
- While serving: the child exiting, or /health failing 3 times in a row, is an outage. In-flight streams are failed
  at once (EngineUnavailable), health() says why, and vLLM is restarted with exponential backoff (1, 2, 4 ... 30 s);
  after MAX_RESTARTS failures in a row we give up with one clear log line. A restart that then serves for a minute
  resets the count.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import re
import shlex
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable

import httpx

from server.backends.vllm.adapters import VLLMAdapter
from server.backends.vllm.launch import VLLMInstall, probe_install, vllm_argv
from server.backends.vllm.probe import healthy
from server.config import Settings
from server.errors import EngineError

log = logging.getLogger("glm_serve.vllm")
child_log = logging.getLogger("glm_serve.vllm.child")

MAX_RESTARTS = 5
STABLE_SECONDS = 60.0  # serving this long after a restart resets the failure count
HEALTH_INTERVAL = 2.0
HEALTH_TIMEOUT = 10.0
HEALTH_FAILURES = 3
_EXIT_NOISE = re.compile(r"nanobind|^ - leaked |^ - \.\.\. skipped remainder|leaked \d+ (types|functions|instances)")
_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b \d\d-\d\d ")


class VLLMStartupError(EngineError):
    """The vLLM child did not become ready; the message carries its last log lines."""

    def __init__(self, message: str):
        super().__init__(message, code="engine_unavailable")


class Supervisor:
    def __init__(self, settings: Settings, *, model_folder: str, served_name: str, adapters: list[VLLMAdapter],
                 max_restarts: int = MAX_RESTARTS):
        self.settings = settings
        self.model_folder = model_folder
        self.served_name = served_name
        self.adapters = adapters
        self.max_restarts = max_restarts
        self.install: VLLMInstall | None = None
        self.base_url = ""
        self.pid: int | None = None
        self.on_down: Callable[[str], None] | None = None  # the backend fails its in-flight streams
        self.ready_seconds: float | None = None  # time to ready of the last start
        self.restarts = 0
        self._reason: str | None = "vLLM is starting"
        self._tail: deque[str] = deque(maxlen=40)
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self._stopping = False

    def down_reason(self) -> str | None:
        return self._reason

    def describe(self) -> str:
        return f"child pid {self.pid} at {self.base_url}"

    async def start(self, client: httpx.AsyncClient) -> None:
        self._client = client
        self.install = await asyncio.to_thread(probe_install, self.settings.vllm_python)
        await self._launch()
        self._watch = asyncio.create_task(self._serve(), name="vllm-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        self._reason = "vLLM is stopping"
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._terminate(grace=30.0)
        atexit.unregister(self._kill_at_exit)

    # -- one start ---------------------------------------------------------------------------------
    async def _launch(self) -> None:
        """Start the child and wait until /health says ready; VLLMStartupError (child killed) otherwise."""
        port = self.settings.vllm_port or _free_port()
        argv = vllm_argv(self.settings, self.install, model_folder=self.model_folder, served_name=self.served_name,
                         port=port, adapters=self.adapters)
        log.info("Starting vLLM %s: %s", self.install.version, shlex.join(argv))
        self._tail.clear()
        self._proc = proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, env=_child_env(), limit=16 * 2**20, preexec_fn=_die_with_parent)
        self.pid, self.base_url = proc.pid, f"http://127.0.0.1:{port}"
        atexit.register(self._kill_at_exit)
        self._pump = asyncio.create_task(self._pump_log(proc), name="vllm-log")
        started = time.monotonic()
        timeout = self.settings.vllm_startup_timeout
        next_note = started + 15
        while True:
            if proc.returncode is not None:
                await self._drain_log()
                await self._kill_group()
                raise VLLMStartupError(f"vLLM exited ({_exit_text(proc.returncode)}) during start-up; its last "
                                       f"log lines:\n{self._last_lines()}")
            if await healthy(self._client, self.base_url, timeout=2.0):
                break
            now = time.monotonic()
            if now - started > timeout:
                await self._terminate(grace=5.0)
                raise VLLMStartupError(f"vLLM was not ready within {timeout:.0f} s (VLLM_STARTUP_TIMEOUT); its last "
                                       f"log lines:\n{self._last_lines()}")
            if now >= next_note:
                log.info("vLLM (pid %d) still starting: %.0f s", proc.pid, now - started)
                next_note += 15
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 1.0)
        self.ready_seconds = time.monotonic() - started
        self._reason = None
        log.info("vLLM ready in %.1f s (pid %d, %s)", self.ready_seconds, proc.pid, self.base_url)

    # -- serving: watch, restart -------------------------------------------------------------------
    async def _serve(self) -> None:
        failures = 0
        while True:
            ready_at = time.monotonic()
            why = await self._until_down(self._proc)
            if time.monotonic() - ready_at >= STABLE_SECONDS:
                failures = 0
            self._outage(f"vLLM {why}")
            await self._terminate(grace=5.0)
            while True:
                failures += 1
                if failures > self.max_restarts:
                    self._reason = (f"vLLM {why}, and {self.max_restarts} restarts in a row failed: gave up. "
                                    "Restart glm-serve once the cause (see vLLM's log above) is fixed.")
                    log.error("%s", self._reason)
                    return
                delay = min(30.0, 2.0 ** (failures - 1))
                self._reason = f"vLLM {why}; restarting it (attempt {failures}/{self.max_restarts})"
                log.warning("%s in %.0f s", self._reason, delay)
                await asyncio.sleep(delay)
                try:
                    await self._launch()
                except VLLMStartupError as exc:
                    why = exc.message.splitlines()[0].removeprefix("vLLM ")
                    log.warning("vLLM restart failed: %s", why)
                    continue
                self.restarts += 1
                break

    async def _until_down(self, proc: asyncio.subprocess.Process) -> str:
        misses = 0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), HEALTH_INTERVAL)
            if proc.returncode is not None:
                return f"exited ({_exit_text(proc.returncode)})"
            if await healthy(self._client, self.base_url, timeout=HEALTH_TIMEOUT):
                misses = 0
            else:
                misses += 1
                if misses >= HEALTH_FAILURES:
                    return f"stopped answering /health ({misses} checks in a row)"

    def _outage(self, reason: str) -> None:
        self._reason = reason
        log.error("%s (pid %s); in-flight requests fail with 503. Last log lines:\n%s", reason, self.pid,
                  self._last_lines(8))
        if self.on_down is not None:
            self.on_down(reason)

    # -- process plumbing --------------------------------------------------------------------------
    async def _pump_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over the limit: take it in pieces
                raw = await proc.stdout.read(2**20)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if not line.strip():
                continue
            self._tail.append(line)
            child_log.log(_line_level(line), "vllm| %s", line)

    async def _drain_log(self) -> None:
        if self._pump is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._pump), 2.0)

    async def _terminate(self, grace: float) -> None:
        """SIGTERM the group, SIGKILL what is left after `grace` seconds, and reap the child."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), grace)
        await self._kill_group()

    async def _kill_group(self) -> None:
        proc = self._proc
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGKILL)  # the engine core and workers too, even after the leader exited
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 10.0)
        await self._drain_log()
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()

    def _kill_at_exit(self) -> None:
        if self._proc is not None:
            _signal_group(self._proc.pid, signal.SIGKILL)

    def _last_lines(self, n: int = 15) -> str:
        lines = [line for line in self._tail if "Route:" not in line][-n:]
        return "\n".join(f"  {line}" for line in lines) or "  (no output)"


def _line_level(line: str) -> int:
    if "Route:" in line or _EXIT_NOISE.search(line):
        return logging.DEBUG  # ~60 lines listing vLLM's routes at every start; ~50 of triton's at every exit
    m = _LEVEL.search(line)
    return getattr(logging, m[1]) if m else logging.INFO


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # its log lines as they happen, not in 8 KiB blocks
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


_PR_SET_PDEATHSIG = 1
_prctl = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now: nothing may load in the forked child


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when glm-serve dies, even by SIGKILL."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
