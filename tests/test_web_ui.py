"""The chat page at / in a real headless Chromium, against the real server: streaming, stop, Chinese, errors."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support import ARTIFACTS, REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Chromium and its driver: apt-get install -y chromium chromium-driver",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

STATIC = REPO / "server" / "static"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1100,800", "--lang=en-US",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # a path: no Selenium Manager
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


class Page:
    def __init__(self, driver, url: str):
        self.d = driver
        driver.get(url)
        driver.execute_script("localStorage.clear()")
        driver.refresh()
        self.until(lambda: self.d.execute_script("return document.getElementById('model').options.length"
                                                 " || document.querySelector('.msg.error')"))

    def el(self, css: str):
        return self.d.find_element(By.CSS_SELECTOR, css)

    def texts(self, css: str) -> list[str]:  # in one script: the page re-renders while it streams
        return self.d.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText.trim())", css)

    def until(self, condition, timeout: float = 120, what: str = "the page"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; page text:\n{self.el('body').text}")

    def set(self, css: str, value: str) -> None:
        self.d.execute_script("arguments[0].value = arguments[1]", self.el(css), value)

    def ask(self, question: str) -> None:
        self.el("#input").send_keys(question + Keys.ENTER)  # the page drops old error notes when it sends
        self.until(lambda: self.busy() or self.texts(".msg.error"), 10, "the request to start")

    def busy(self) -> bool:
        return self.d.execute_script("return document.body.dataset.busy") == "true"

    def answer(self) -> str:
        answers = self.texts(".msg.assistant .content")
        return answers[-1] if answers else ""

    def follow_answer(self) -> list[str]:
        """The last answer's text, sampled until it is complete."""
        seen = [""]
        while True:
            busy, text = self.busy(), self.answer()
            if text != seen[-1]:
                seen.append(text)
            if not busy:
                return seen
            time.sleep(0.05)


def running_requests(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search(r"^glm_serve_running_requests (\S+)", text, re.M).group(1))


def test_chat_streams_stops_and_recovers(server, browser):
    page = Page(browser, server.url + "/")
    models = [o.get_attribute("value") for o in page.d.find_elements(By.CSS_SELECTOR, "#model option")]
    assert models[0] == MODEL
    page.set("#temperature", "0")
    page.set("#max-tokens", "24")

    page.ask("What is the capital of France?")
    seen = page.follow_answer()
    assert "Paris" in seen[-1]
    assert len(seen) >= 4 and all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen  # it grew, in steps
    assert re.search(r"\d+ prompt \+ \d+ answer tokens · [\d.]+ tokens/s", page.texts(".msg .stats")[-1])

    # A long answer, stopped once a few words are in: it stops growing, the server stops, the page is usable.
    page.set("#max-tokens", "400")
    page.ask("Tell me a long story about a brave dragon.")
    page.until(lambda: len(page.answer().split()) >= 3, what="the story to start")
    page.el("#stop").click()
    page.until(lambda: not page.busy(), 10, "the stop")
    stopped = page.answer()
    time.sleep(2)
    assert page.answer() == stopped
    assert page.texts(".msg .stats")[-1] == "Stopped · 已停止"
    assert page.el("#send").is_displayed() and not page.el("#stop").is_displayed()
    page.until(lambda: running_requests(server) == 0, 15, "the server to cancel the generation")

    page.set("#max-tokens", "24")
    page.ask("What is 2+2? Answer with one number.")
    assert re.search(r"\b(4|four)\b", page.follow_answer()[-1], re.I)
    assert len(page.texts(".msg.user")) == 3 and not page.texts(".msg.error")
    ARTIFACTS.mkdir(exist_ok=True)
    page.d.save_screenshot(str(ARTIFACTS / "web_ui.png"))


def test_chinese_question_displays_and_persists(server, browser):
    page = Page(browser, server.url + "/")
    assert page.d.execute_script("return document.characterSet") == "UTF-8"
    page.set("#temperature", "0")  # greedy: this tiny English model echoes whole Chinese characters
    page.set("#max-tokens", "16")
    question = "你好！请用中文介绍一下你自己。谢谢"
    page.ask(question)
    answer = page.follow_answer()[-1]
    assert page.texts(".msg.user") == [question]
    assert re.search(r"[\u4e00-\u9fff]{3}", answer) and "\ufffd" not in answer, answer
    page.d.save_screenshot(str(ARTIFACTS / "web_ui_zh.png"))
    page.d.refresh()  # the conversation comes back from localStorage
    page.until(lambda: page.texts(".msg.user") == [question], 10, "the saved conversation")
    assert page.answer() == answer
    page.el("#clear").click()
    assert not page.texts(".msg") and page.d.execute_script("return localStorage['glm-serve.chat.history']") == "[]"


def test_markdown_is_escaped_and_rendered(server, browser):
    page = Page(browser, server.url + "/")
    html = page.d.execute_script("return markdown(arguments[0])",
                                 "<img src=x onerror=alert(1)> **b** *i* `<x>` [ok](https://a.b/?q=1&r=2) "
                                 "[no](javascript:alert(1))\n\n- one\n- two\n\n```\n<b>code</b>\n```")
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<strong>b</strong>" in html and "<em>i</em>" in html and "<code>&lt;x&gt;</code>" in html
    assert '<a href="https://a.b/?q=1&amp;r=2" target="_blank" rel="noopener noreferrer">ok</a>' in html
    assert "[no](javascript:alert(1))" in html and 'href="javascript' not in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert "<pre><code>&lt;b&gt;code&lt;/b&gt;</code></pre>" in html


def test_context_too_long_in_plain_words(server, browser):
    page = Page(browser, server.url + "/")
    page.set("#system", "word " * 9000)
    page.ask("Hello")
    page.until(lambda: not page.busy(), 60, "the answer")
    error = page.texts(".msg.error")[-1]
    assert error.startswith("The conversation is too long for the model. This model's maximum context length is 8192")
    assert page.el("#input").get_attribute("value") == "Hello"  # given back to resend
    assert not page.texts(".msg.user")


@contextmanager
def stub_server(status: int, message: str, headers: dict | None = None):
    """Serves the page's files, lists one model, and answers every chat request with `status`.

    Yields its URL and the Authorization headers it saw on chat requests.
    """
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, data: bytes, content_type: str, extra: dict | None = None) -> None:
            self.send_response(status)
            for k, v in {"Content-Type": content_type, "Content-Length": str(len(data)), **(extra or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path == "/v1/models":
                body = {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "test"}]}
                return self._send(200, json.dumps(body).encode(), "application/json")
            name = "index.html" if self.path == "/" else Path(self.path).name
            types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
            self._send(200, (STATIC / name).read_bytes(), types[Path(name).suffix] + "; charset=utf-8")

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(self.headers.get("Authorization"))
            body = {"error": {"message": message, "type": "x", "param": None, "code": None}}
            self._send(status, json.dumps(body).encode(), "application/json", headers)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(("status", "message", "headers", "expected"), [
    (401, "Invalid API key.", None, "API key missing or wrong: enter it in the API key field. (Invalid API key.)"),
    (429, "Too many requests.", {"Retry-After": "7"}, "The server is busy. Too many requests. Try again in 7 s."),
], ids=["401", "429"])
def test_auth_and_overload_errors_in_plain_words(browser, status, message, headers, expected):
    with stub_server(status, message, headers) as (url, authorization):
        page = Page(browser, url + "/")
        page.set("#api-key", "sk-wrong")
        page.ask("Hello")
        page.until(lambda: page.texts(".msg.error"), 30, "the error")
        assert page.texts(".msg.error") == [expected]
        assert authorization == ["Bearer sk-wrong"]
    page.el("#send").click()  # the stub is gone now
    page.until(lambda: len(page.texts(".msg.error")) == 1 and "Cannot reach" in page.texts(".msg.error")[0], 30)
