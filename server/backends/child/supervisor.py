"""An engine server as our child process, started, watched, restarted and stopped by us (vLLM, llama-server).

- Its own process group (vLLM forks an engine core and workers): stopping or cleaning up signals the whole group,
  so no orphan keeps the port, the memory or the GPU. That matters: when only vLLM's API server dies, its engine
  core and worker stay alive and spin on the CPU (seen here: 1.1 cores for 11 minutes). If we exit without
  stop(), an atexit hook kills the group; if we are SIGKILLed, the child gets SIGTERM from the kernel
  (PR_SET_PDEATHSIG, Linux) and takes its own children down.
- Its output goes to our log line by line, prefixed with the engine's tag ("vllm|", "llama.cpp|"), at the
  engine's own level; the last lines are kept, so a failed start-up says why in the engine's words.
- Ready = GET /health answers 200 within the start-up timeout. Exiting first fails start-up at once, with no
  restart (the same settings would fail the same way): one line with the engine's own error (`startup_cause`,
  found in its kept lines: vLLM's root-cause exception sits far above its API server's wrapper traceback) and
  what to change (`hints`), then its last lines.
- While serving: the child exiting, or /health failing 3 times in a row, is an outage. In-flight streams are failed
  at once (EngineUnavailable), health() says why, and the child is restarted with exponential backoff (1, 2, 4 ...
  30 s); after MAX_RESTARTS failures in a row we give up with one clear log line. A restart that then serves for
  a minute resets the count.

A subclass says what the engine is: `label`, `prepare()` (a one-time probe of the install), `argv(port)`,
`line_level(line)`, `child_env()`, and for a failed start `startup_cause(lines)` and `hints`.
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

from server.errors import EngineError

MAX_RESTARTS = 5
STABLE_SECONDS = 60.0  # serving this long after a restart resets the failure count
HEALTH_INTERVAL = 2.0
HEALTH_TIMEOUT = 10.0
HEALTH_FAILURES = 3


class ChildStartupError(EngineError):
    """The child did not become ready; the message carries its last log lines."""

    def __init__(self, message: str):
        super().__init__(message, code="engine_unavailable")


async def healthy(client: httpx.AsyncClient, base_url: str, timeout: float = 5.0) -> bool:
    try:
        return (await client.get(f"{base_url}/health", timeout=timeout)).status_code == 200
    except httpx.HTTPError:
        return False


class ChildSupervisor:
    label = "the engine"  # "vLLM", "llama.cpp": how messages name it
    tag = "child"  # its log lines' prefix
    timeout_setting = ""  # the setting that holds the start-up timeout, named in the message when it runs out

    def __init__(self, *, port: int, startup_timeout: float, log: logging.Logger, child_log: logging.Logger,
                 max_restarts: int = MAX_RESTARTS):
        self.port_setting = port  # 0: a free one on 127.0.0.1
        self.startup_timeout = startup_timeout
        self.log = log
        self.child_log = child_log
        self.max_restarts = max_restarts
        self.base_url = ""
        self.pid: int | None = None
        self.on_down: Callable[[str], None] | None = None  # the backend fails its in-flight streams
        self.ready_seconds: float | None = None  # time to ready of the last start
        self.restarts = 0
        self._reason: str | None = f"{self.label} is starting"
        # vLLM's engine core, its worker and its API server each print a traceback when start-up fails (~200 lines):
        # enough kept that the first, the root cause, is still there.
        self._tail: deque[str] = deque(maxlen=400)
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self._stopping = False

    # -- what a subclass says ----------------------------------------------------------------------
    async def prepare(self) -> None:
        """Once, before the first start (e.g. probe the install); raise ConfigError if it cannot work."""

    def argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def line_level(self, line: str) -> int:
        return logging.INFO

    def child_env(self) -> dict[str, str]:
        return dict(os.environ)

    def version(self) -> str:
        return ""

    def shown(self, argv: list[str]) -> list[str]:
        """The command line as logged (a subclass hides secrets)."""
        return argv

    def startup_cause(self, lines: list[str]) -> str:
        """The engine's own error in its last output lines, as one line ('' when it printed none)."""
        return ""

    # (pattern, what to change): the first whose pattern is in the cause (or, failing that, in how it ended) wins
    hints: tuple[tuple[re.Pattern[str], str], ...] = ()

    def startup_failure(self, ended: str) -> str:
        """The message of a failed start: its first line says what the engine said and what to change."""
        cause = self.startup_cause(list(self._tail))
        hints = (*self.hints, (re.compile("killed by SIGKILL"), _KILLED_HINT))
        hint = next((h for p, h in hints if cause and p.search(cause)), "") or next(
            (h for p, h in hints if p.search(ended)), "")
        first = f"{self.label} {ended}" + (f": {cause}" if cause else "") + (f" -> {hint}" if hint else "")
        return f"{first}\n{self.label}'s last log lines:\n{self._last_lines()}"

    # -- lifecycle ---------------------------------------------------------------------------------
    def down_reason(self) -> str | None:
        return self._reason

    def describe(self) -> str:
        return f"child pid {self.pid} at {self.base_url}"

    async def start(self, client: httpx.AsyncClient) -> None:
        self._client = client
        await self.prepare()
        await self._launch()
        self._watch = asyncio.create_task(self._serve(), name=f"{self.tag}-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        self._reason = f"{self.label} is stopping"
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._terminate(grace=30.0)
        atexit.unregister(self._kill_at_exit)

    # -- one start ---------------------------------------------------------------------------------
    async def _launch(self) -> None:
        """Start the child and wait until /health says ready; ChildStartupError (child killed) otherwise."""
        port = self.port_setting or free_port()
        argv = self.argv(port)
        version = self.version()
        self.log.info("Starting %s%s: %s", self.label, f" {version}" if version else "", shlex.join(self.shown(argv)))
        self._tail.clear()
        self._proc = proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, env=self.child_env(), limit=16 * 2**20, preexec_fn=_die_with_parent)
        self.pid, self.base_url = proc.pid, f"http://127.0.0.1:{port}"
        atexit.register(self._kill_at_exit)
        self._pump = asyncio.create_task(self._pump_log(proc), name=f"{self.tag}-log")
        started = time.monotonic()
        timeout = self.startup_timeout
        next_note = started + 15
        while True:
            if proc.returncode is not None:
                await self._drain_log()
                await self._kill_group()
                raise ChildStartupError(self.startup_failure(f"exited ({_exit_text(proc.returncode)}) during "
                                                             "start-up"))
            if await healthy(self._client, self.base_url, timeout=2.0):
                break
            now = time.monotonic()
            if now - started > timeout:
                await self._terminate(grace=5.0)
                where = f" ({self.timeout_setting})" if self.timeout_setting else ""
                raise ChildStartupError(self.startup_failure(f"was not ready within {timeout:.0f} s{where}"))
            if now >= next_note:
                self.log.info("%s (pid %d) still starting: %.0f s", self.label, proc.pid, now - started)
                next_note += 15
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 1.0)
        self.ready_seconds = time.monotonic() - started
        self._reason = None
        self.log.info("%s ready in %.1f s (pid %d, %s)", self.label, self.ready_seconds, proc.pid, self.base_url)

    # -- serving: watch, restart -------------------------------------------------------------------
    async def _serve(self) -> None:
        failures = 0
        while True:
            ready_at = time.monotonic()
            why = await self._until_down(self._proc)
            if time.monotonic() - ready_at >= STABLE_SECONDS:
                failures = 0
            self._outage(f"{self.label} {why}")
            await self._terminate(grace=5.0)
            while True:
                failures += 1
                if failures > self.max_restarts:
                    self._reason = (f"{self.label} {why}, and {self.max_restarts} restarts in a row failed: gave up. "
                                    f"Restart glm-serve once the cause (see {self.label}'s log above) is fixed.")
                    self.log.error("%s", self._reason)
                    return
                delay = min(30.0, 2.0 ** (failures - 1))
                self._reason = f"{self.label} {why}; restarting it (attempt {failures}/{self.max_restarts})"
                self.log.warning("%s in %.0f s", self._reason, delay)
                await asyncio.sleep(delay)
                try:
                    await self._launch()
                except ChildStartupError as exc:
                    why = exc.message.splitlines()[0].removeprefix(f"{self.label} ")
                    self.log.warning("%s restart failed: %s", self.label, why)
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
        self.log.error("%s (pid %s); in-flight requests fail with 503. Last log lines:\n%s", reason, self.pid,
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
            self.child_log.log(self.line_level(line), "%s| %s", self.tag, line)

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
        _signal_group(proc.pid, signal.SIGKILL)  # its own children too, even after the leader exited
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 10.0)
        await self._drain_log()
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()

    def _kill_at_exit(self) -> None:
        if self._proc is not None:
            _signal_group(self._proc.pid, signal.SIGKILL)

    def _last_lines(self, n: int = 15) -> str:
        lines = [line for line in self._tail if self.line_level(line) > logging.DEBUG][-n:]
        return "\n".join(f"  {line}" for line in lines) or "  (no output)"


# SIGKILL during start-up that we did not send: the engine said nothing, the kernel's out-of-memory killer did it.
_KILLED_HINT = ("nobody asked it to stop: on Linux that is most often the kernel's out-of-memory killer (dmesg "
                "says so); give the engine less to allocate (a lower MAX_MODEL_LEN or MAX_RUNNING_REQUESTS, a "
                "smaller model) or stop what else uses this machine's memory")


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1
_prctl = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up now: nothing may load in the forked child


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when glm-serve dies, even by SIGKILL."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
