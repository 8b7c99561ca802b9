"""The chat page at / in a real headless Chromium, against the real server: streaming, stop, Chinese, errors."""

from __future__ import annotations

import re
import shutil
import time
from contextlib import nullcontext

import httpx
import pytest

from tests import full_server
from tests.full_server import FULL, KEY, REJECTED, server_full
from tests.support import ARTIFACTS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    # A missing browser is a gap, not a pass: .ci/run installs it.
    pytest.fail("needs Chromium and its driver: apt-get install -y chromium chromium-driver", pytrace=False)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

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
    def __init__(self, driver, url: str, api_key: str = ""):
        self.d = driver
        driver.get(url)
        driver.execute_script("localStorage.clear();"  # the page reads its saved key as JSON
                              "if (arguments[0]) localStorage['glm-serve.chat.apiKey'] = JSON.stringify(arguments[0])",
                              api_key)
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


# ---- 401, 429 and a server that is gone, from a second real server: keys on, the smallest capacity ----------


@pytest.fixture(scope="module")
def keyed_server():
    with full_server.keyed_server("web-ui-keyed") as srv:
        yield srv


@pytest.mark.parametrize(("key", "expected"), [
    ("sk-wrong", f"API key missing or wrong: enter it in the API key field. ({REJECTED})"),
    (KEY, f"The server is busy. {FULL} Try again in 1 s."),
], ids=["401", "429"])
def test_auth_and_overload_errors_in_plain_words(keyed_server, browser, key, expected):
    page = Page(browser, keyed_server.url + "/", api_key=key)
    if key == KEY:  # the model list loads; then every slot is taken
        assert page.d.execute_script("return Array.from(document.getElementById('model').options, o => o.value)") \
            == [MODEL] and not page.texts(".msg.error")
        busy = server_full(keyed_server)
    else:  # refused already for the model list
        assert page.texts(".msg.error") == [f"Could not list the models. {expected}"]
        busy = nullcontext()
    with busy:
        page.el("#input").send_keys("Hello" + Keys.ENTER)  # the page drops the old error note when it sends
        page.until(lambda: not page.busy() and page.texts(".msg.error") == [expected], 30, "the error")
    assert page.el("#input").get_attribute("value") == "Hello"  # given back to resend
    assert not page.texts(".msg.user")


def test_server_gone_in_plain_words(keyed_server, browser):
    # Stops the module's keyed server: keep this test after every other one that uses it.
    page = Page(browser, keyed_server.url + "/", api_key=KEY)
    assert page.d.execute_script("return document.getElementById('model').options.length") == 1
    keyed_server.stop()
    page.el("#input").send_keys("Hello" + Keys.ENTER)
    page.until(lambda: not page.busy() and page.texts(".msg.error"), 30, "the error")
    assert page.texts(".msg.error") == ["Cannot reach the server. Is it running? 无法连接服务器。"]
    assert page.el("#input").get_attribute("value") == "Hello"
