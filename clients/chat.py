"""Chat with glm-serve (or any OpenAI-compatible server) in the terminal.

    python -m clients.chat                                     # server (or SSH tunnel) on 127.0.0.1:6006
    python -m clients.chat --base-url http://gpu-box:6006/v1 --api-key sk-... --system "Answer briefly."

Answers stream as they are generated; the conversation is kept until /clear. Ctrl-C stops an answer
(the server stops generating it too); Ctrl-C twice at the prompt, /quit or Ctrl-D leaves.
Defaults come from OPENAI_BASE_URL / OPENAI_API_KEY. Exit status: 0 normal, 1 error at start, 2 no server.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import httpx
import openai

try:
    import readline  # noqa: F401  (line editing and history for input())
except ImportError:  # Windows
    pass

DEFAULT_BASE_URL = "http://127.0.0.1:6006/v1"
NO_KEY = "sk-no-key-required"  # the SDK wants a key; a server without API_KEYS ignores it

HELP = """Commands:
  /clear          forget the conversation (the system prompt stays)
  /system <text>  set the system prompt; /system alone shows it, /system - removes it
  /help           this help
  /quit           leave (also Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while an answer streams stops that answer."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=os.getenv("OPENAI_BASE_URL") or DEFAULT_BASE_URL, help="API root, ends in /v1")
    p.add_argument("--api-key", default=os.getenv("OPENAI_API_KEY") or NO_KEY, help="one of the server's API keys")
    p.add_argument("--model", help="model id (default: the first chat model in /v1/models)")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    p.add_argument("--max-tokens", type=int, help="longest answer in tokens (default: the server's)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    return p.parse_args(argv)


def explain(exc: Exception, base_url: str) -> str:
    """An SDK exception in plain words, using the message of the server's error JSON."""
    if isinstance(exc, openai.APIConnectionError):  # also timeouts
        cause = exc.__cause__ or exc
        return f"Cannot reach the server at {base_url} ({cause}). Is it running? Start it with: python -m server"
    if isinstance(exc, httpx.HTTPError):  # raised while reading a stream
        return f"The connection to the server broke ({exc or type(exc).__name__})."
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    message = message or getattr(exc, "message", None) or str(exc)
    if not isinstance(exc, openai.APIStatusError):
        return f"The server stopped the answer: {message}"  # an error sent inside the stream
    status, code = exc.status_code, getattr(exc, "code", None)
    if status == 401:
        return f"API key missing or wrong (pass --api-key or set OPENAI_API_KEY). Server said: {message}"
    if status == 429:
        wait = exc.response.headers.get("retry-after")
        return f"The server is busy. {message}" + (f" Try again in {wait} s." if wait else "")
    if code == "context_length_exceeded":
        return f"The conversation is too long for the model. {message} Start over with /clear (or a shorter /system)."
    return f"Error {status}: {message}"


def pick_model(client: openai.OpenAI) -> str | None:
    """The first chat model: cards tagged with a kind are matched by it; glm-serve lists chat models first."""
    models = list(client.models.list())
    chat = [m.id for m in models if getattr(m, "kind", None) in (None, "chat")]
    return chat[0] if chat else None


class Chat:
    def __init__(self, client: openai.OpenAI, args: argparse.Namespace, model: str):
        self.client, self.args, self.model = client, args, model
        self.system = args.system
        self.history: list[dict] = []
        self.dim = sys.stdout.isatty() and os.getenv("TERM") != "dumb" and not os.getenv("NO_COLOR")

    def note(self, text: str) -> None:
        print(f"\033[2m{text}\033[0m" if self.dim else text, flush=True)

    def run(self) -> int:
        self.note(f"Chatting with {self.model} at {self.args.base_url}. /help for commands, /quit to leave.")
        interrupted = False
        while True:
            try:
                line = input("\nyou> ").strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                if interrupted:
                    print()
                    return 0
                interrupted = True
                print("\n(Ctrl-C again or /quit to leave)")
                continue
            interrupted = False
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line):
                    return 0
                continue
            self.ask(line)

    def command(self, line: str) -> bool:
        """Runs a /command; True means leave."""
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit"):
            return True
        if name == "/clear":
            self.history.clear()
            self.note("Conversation cleared.")
        elif name == "/system":
            if rest == "-":
                self.system = ""
                self.note("System prompt removed.")
            elif rest:
                self.system = rest
                self.note("System prompt set.")
            else:
                self.note(f"System prompt: {self.system}" if self.system else "No system prompt (/system <text>).")
        elif name == "/help":
            print(HELP)
        else:
            self.note(f"Unknown command {name}. /help lists the commands.")
        return False

    def ask(self, question: str) -> None:
        self.history.append({"role": "user", "content": question})
        system = [{"role": "system", "content": self.system}] if self.system else []
        options = {"temperature": self.args.temperature, "max_tokens": self.args.max_tokens}
        parts: list[str] = []
        usage, first, stream = None, None, None
        started = time.monotonic()
        print("assistant> ", end="", flush=True)
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=system + self.history, stream=True,
                stream_options={"include_usage": True}, **{k: v for k, v in options.items() if v is not None})
            for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        first = first or time.monotonic()
                        parts.append(choice.delta.content)
                        print(choice.delta.content, end="", flush=True)
        except KeyboardInterrupt:
            try:
                if stream is not None:
                    stream.close()  # drops the connection: the server cancels the generation
            except KeyboardInterrupt:
                pass
            print()
            self.note("[answer stopped]")
        except (openai.OpenAIError, httpx.HTTPError) as exc:
            print()
            self.note(explain(exc, self.args.base_url))
        else:
            print()
            self.note(stats(usage, started, first, time.monotonic()))
        if parts:
            self.history.append({"role": "assistant", "content": "".join(parts)})
        else:
            self.history.pop()  # unanswered: the question can be asked again without repeating it


def stats(usage, started: float, first: float | None, ended: float) -> str:
    waited = f"first token after {(first or ended) - started:.2f} s"
    if usage is None:
        return f"[{waited}; the server sent no token counts]"
    # The first token pays for the prompt; the speed is how fast the rest came.
    later = usage.completion_tokens - 1
    speed = later / (ended - first) if first and ended > first and later > 0 else 0.0
    return (f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} answer tokens, "
            f"{speed:.1f} tokens/s, {waited}]")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=0)
    try:
        model = args.model or pick_model(client)
    except openai.OpenAIError as exc:
        print(explain(exc, args.base_url), file=sys.stderr)
        return 2 if isinstance(exc, openai.APIConnectionError) else 1
    except KeyboardInterrupt:
        return 130
    if model is None:
        print(f"The server at {args.base_url} lists no chat model; pass --model.", file=sys.stderr)
        return 1
    return Chat(client, args, model).run()


if __name__ == "__main__":
    sys.exit(main())
