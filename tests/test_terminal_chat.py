"""clients/chat.py used as a person would: in a pseudo-terminal, typing, reading, pressing Ctrl-C."""

from __future__ import annotations

import codecs
import fcntl
import os
import re
import select
import signal
import subprocess
import sys
import termios
import time
from contextlib import nullcontext

import httpx
import pytest

from tests import full_server
from tests.full_server import FULL, KEY, MODEL, REJECTED, server_full
from tests.support import ARTIFACTS, REPO, free_port

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
STATS = re.compile(r"\[(\d+) prompt \+ (\d+) answer tokens, [\d.]+ tokens/s, first token after [\d.]+ s\]")


def _controlling_tty() -> None:  # in the child, after setsid: make the pty its terminal, so \x03 means SIGINT
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A program in a pty; `expect` waits for a regex in what it printed (ANSI codes removed)."""

    def __init__(self, *args: str):
        master, slave = os.openpty()
        env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "clients.chat", *args], cwd=REPO, env=env,
                                     stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True, preexec_fn=_controlling_tty)
        os.close(slave)
        self.fd = master
        self.text, self.pos = "", 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the program exited and the pty is closed
            data = b""
        self.text += ANSI.sub("", self._decoder.decode(data))
        return bool(data)

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        regex, deadline = re.compile(pattern), time.monotonic() + timeout
        while True:
            m = regex.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline or not self._read(min(0.2, max(0.0, deadline - time.monotonic()))):
                raise AssertionError(f"no {pattern!r} in the output:\n{self.text[self.pos:]!r}")

    def since(self, pattern: str, timeout: float = 120) -> str:
        """The output from the current position up to `pattern`."""
        start = self.pos
        m = self.expect(pattern, timeout)
        return self.text[start:m.start()]

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        if self.proc.poll() is None:
            raise AssertionError(f"still running after {timeout} s; its output:\n{self.text[-2000:]}")
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.fd)


@pytest.fixture
def terminal(request):
    """Starts clients.chat in pty; the transcripts land in artifacts/ for a look after the run."""
    opened = []

    def start(*args: str) -> Terminal:
        opened.append(Terminal(*args))
        return opened[-1]

    yield start
    ARTIFACTS.mkdir(exist_ok=True)
    name = re.sub(r"[^\w-]+", "_", request.node.name)
    (ARTIFACTS / f"terminal_chat-{name}.txt").write_text("\n---\n".join(t.text for t in opened))
    for t in opened:
        t.close()


def running_requests(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search(r"^glm_serve_running_requests (\S+)", text, re.M).group(1))


def test_conversation_stop_and_quit(server, terminal):
    t = terminal("--base-url", server.base_url, "--temperature", "0", "--max-tokens", "400",
                 "--system", "You are a helpful assistant.")
    t.expect(r"Chatting with SmolLM2-135M-Instruct")
    t.expect(r"you> ")
    t.send("What is the capital of France?\r")
    answer = t.since(STATS.pattern)
    assert "Paris" in answer
    prompt_tokens, answer_tokens = map(int, re.search(STATS, t.text).groups())
    assert prompt_tokens > 5 and 0 < answer_tokens < 50

    t.expect(r"you> ")
    t.send("/clear\r")
    t.expect(r"Conversation cleared\.")
    t.send("/help\r")
    t.expect(r"/system <text>")

    # A long answer, stopped with Ctrl-C once it is streaming: the session stays, the server stops generating.
    t.expect(r"you> ")
    t.send("Tell me a long story about a brave dragon.\r")
    t.expect(r"assistant> \S+ \S+ \S+")  # a few words arrived
    t.send("\x03")
    t.expect(r"\[answer stopped\]", timeout=10)
    deadline = time.monotonic() + 15
    while running_requests(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_requests(server) == 0, "the server kept generating after Ctrl-C"

    t.expect(r"you> ")
    t.send("What is 2+2? Answer with one number.\r")
    assert re.search(r"\b(4|four)\b", t.since(STATS.pattern), re.I)

    t.expect(r"you> ")
    t.send("/quit\r")
    assert t.wait() == 0
    assert "Traceback" not in t.text


def test_ctrl_c_at_the_prompt_then_eof(server, terminal):
    t = terminal("--base-url", server.base_url, "--max-tokens", "8")
    t.expect(r"you> ")
    time.sleep(0.5)  # as a person would: the prompt is on screen a moment before Ctrl-C (the client is in input())
    t.send("\x03")
    t.expect(r"Ctrl-C again or /quit to leave")
    t.expect(r"you> ")
    t.send("/system Answer in French.\r")
    t.expect(r"System prompt set\.")
    t.send("/system\r")
    t.expect(r"System prompt: Answer in French\.")
    t.expect(r"you> ")  # Ctrl-D typed before the prompt shows would be eaten by the terminal, not by input()
    t.send("\x04")  # Ctrl-D
    assert t.wait() == 0
    assert "Traceback" not in t.text


def test_errors_in_plain_words(server, terminal):
    t = terminal("--base-url", server.base_url, "--model", "no-such-model")
    t.expect(r"you> ")
    t.send("Hello\r")
    t.expect(r"Error 404: The model 'no-such-model' does not exist")
    t.expect(r"you> ")  # still chatting
    t.send("/quit\r")
    assert t.wait() == 0

    t = terminal("--base-url", server.base_url, "--system", "word " * 9000)
    t.expect(r"you> ")
    t.send("Hello\r")
    t.expect(r"The conversation is too long for the model\. This model's maximum context length is 8192")
    t.expect(r"you> ")
    t.send("\x04")
    assert t.wait() == 0
    assert "Traceback" not in t.text


# ---- 401 and 429 from a second real server: keys on, the smallest capacity ---------------------------------


@pytest.fixture(scope="module")
def keyed_server():
    with full_server.keyed_server("terminal-keyed", WEB_UI="false") as srv:
        yield srv


@pytest.mark.parametrize(("key", "expected"), [
    ("sk-wrong", f"API key missing or wrong (pass --api-key or set OPENAI_API_KEY). Server said: {REJECTED}"),
    (KEY, f"The server is busy. {FULL} Try again in 1 s."),
], ids=["401", "429"])
def test_auth_and_overload_errors(keyed_server, terminal, key, expected):
    # --model: without it a wrong key is refused already for the model list (test_wrong_key_at_start).
    t = terminal("--base-url", keyed_server.base_url, "--api-key", key, "--model", MODEL)
    t.expect(rf"Chatting with {MODEL}")
    t.expect(r"you> ")
    with server_full(keyed_server) if key == KEY else nullcontext():
        t.send("Hello\r")
        t.expect(r"assistant> \n" + re.escape(expected) + r"\n")
    t.expect(r"you> ")  # still chatting
    t.send("/quit\r")
    assert t.wait() == 0
    assert "Traceback" not in t.text


def test_wrong_key_at_start(keyed_server, terminal):
    t = terminal("--base-url", keyed_server.base_url, "--api-key", "sk-wrong")
    t.expect(re.escape(f"API key missing or wrong (pass --api-key or set OPENAI_API_KEY). Server said: {REJECTED}"),
             timeout=30)
    assert t.wait() == 1
    assert "Traceback" not in t.text


def test_no_server(terminal):
    t = terminal("--base-url", f"http://127.0.0.1:{free_port()}/v1")
    t.expect(r"Cannot reach the server at http://127\.0\.0\.1:\d+/v1 \(.*\)\. Is it running\?", timeout=30)
    assert t.wait() == 2
    assert "Traceback" not in t.text
