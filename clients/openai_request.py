#!/usr/bin/env python3
"""Exercise glm-serve through the official `openai` SDK: models, chat, streaming chat, a tool call, embeddings.

    python clients/openai_request.py                                   # server (or SSH tunnel) on 127.0.0.1:6006
    python clients/openai_request.py --base-url http://gpu-box:6006/v1 --api-key sk-...
    python clients/openai_request.py --steps stream --prompt "Write a haiku about GPUs"

Defaults come from OPENAI_BASE_URL / OPENAI_API_KEY (environment or `.env`).
Exit status: 0 ok, 1 the server answered with an error, 2 no answer (cannot connect, or timed out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import openai
from dotenv import find_dotenv, load_dotenv

DEFAULT_BASE_URL = "http://127.0.0.1:6006/v1"
# The SDK refuses to run without a key; a server started without API_KEYS ignores whatever we send.
NO_KEY = "sk-no-key-required"
STEPS = ("models", "chat", "stream", "tools", "embeddings")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given city",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name, e.g. Beijing"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}


def load_env() -> None:
    # A .env in the current directory first, then the repo's; variables already set always win.
    load_dotenv(find_dotenv(usecwd=True))
    load_dotenv(Path(__file__).resolve().parent.parent / ".env")


def pick_model(models: list, kind: str) -> str | None:
    """The first /v1/models entry of a kind ("chat" or "embedding").

    Entries tagged with "kind" are matched by it. Untagged lists are taken in glm-serve's order: chat
    models (and their aliases) first, the embedding model last.
    """
    ids = [m.id for m in models]
    kinds = [getattr(m, "kind", None) for m in models]
    if any(kinds):
        ids = [i for i, k in zip(ids, kinds, strict=True) if (k == "embedding") == (kind == "embedding")]
        return ids[0] if ids else None
    if kind == "chat":
        return ids[0] if ids else None
    return ids[-1] if len(ids) > 1 else None


def chat(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> None:
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.7,
    )
    choice = resp.choices[0]
    print(choice.message.content)
    if resp.usage:
        u = resp.usage
        print(f"  [finish_reason={choice.finish_reason}, tokens: {u.prompt_tokens} in, {u.completion_tokens} out]")


def stream(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> None:
    chunks = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True
    )
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.delta.content:
                print(choice.delta.content, end="", flush=True)
            finish = choice.finish_reason or finish
    print(f"\n  [finish_reason={finish}]")


def tools(client: openai.OpenAI, model: str, max_tokens: int) -> None:
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What's the weather like in Beijing today?"}],
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        max_tokens=max_tokens,
    )
    msg = resp.choices[0].message
    # Small models may just answer in text; that is a valid response, not an error.
    for call in msg.tool_calls or []:
        print(f"  tool call {call.id}: {call.function.name}({call.function.arguments})")
    if msg.content:
        print(f"  text: {msg.content}")
    print(f"  [finish_reason={resp.choices[0].finish_reason}]")


def embeddings(client: openai.OpenAI, model: str, encoding_format: str | None) -> None:
    texts = ["The cat sits on the mat.", "A kitten is resting on a rug.", "Stock markets fell sharply today."]
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    kw = {"encoding_format": encoding_format} if encoding_format else {}
    resp = client.embeddings.create(model=model, input=texts, **kw)
    vecs = [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]
    head = [round(x, 4) for x in vecs[0][:4]]
    print(f"  model={resp.model} vectors={len(vecs)} dimensions={len(vecs[0])} first values={head}")
    for i in (1, 2):
        print(f"  cosine({texts[0]!r}, {texts[i]!r}) = {cosine(vecs[0], vecs[i]):.3f}")
    if resp.usage:
        print(f"  [prompt_tokens={resp.usage.prompt_tokens}]")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0)


def error_text(body: object) -> str:
    """The human part of an error body: {"message": ...} (the SDK drops the "error" wrapper) or FastAPI detail."""
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            if body.get(key):
                value = body[key]
                return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return str(body) if body else ""


def explain_status(err: openai.APIStatusError, base_url: str) -> str:
    detail = error_text(err.body) or err.message
    hints = {
        401: "API key not accepted: pass --api-key or set OPENAI_API_KEY to one of the server's API_KEYS",
        403: "the API key was refused",
        404: f"not found: does --base-url end in /v1 ({base_url}) and is the model listed by /v1/models?",
        429: "the server is busy (its request queue is full); try again in a moment",
        400: "the server rejected the request",
        422: "the server rejected the request (invalid fields)",
        413: "the request is too large",
    }
    hint = hints.get(err.status_code, "the server reported an error")
    return f"HTTP {err.status_code}: {hint}\n  server said: {detail}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=os.getenv("OPENAI_BASE_URL") or DEFAULT_BASE_URL, help="API root, ends in /v1")
    p.add_argument("--api-key", default=os.getenv("OPENAI_API_KEY") or NO_KEY, help="one of the server's API_KEYS")
    p.add_argument("--model", help="chat model id (default: the first chat model in /v1/models)")
    p.add_argument("--embedding-model", help="embedding model id (default: the embedding model in /v1/models)")
    p.add_argument("--prompt", default="Briefly introduce yourself in two sentences.")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--encoding-format", choices=["float", "base64"], help="embeddings format (SDK default: base64)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="what to run (default: all)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    # The SDK retries 429/5xx/connection errors twice by default, which hides the error for a while.
    p.add_argument("--max-retries", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    load_env()
    args = parse_args(argv)
    client = openai.OpenAI(
        base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=args.max_retries
    )
    try:
        need_chat = not args.model and {"chat", "stream", "tools"} & set(args.steps)
        need_list = "models" in args.steps or need_chat or (not args.embedding_model and "embeddings" in args.steps)
        models = list(client.models.list()) if need_list else []
        if "models" in args.steps:
            print(f"== models at {args.base_url}")
            for m in models:
                print(f"  {m.id:40s} kind={getattr(m, 'kind', None) or '?'} owned_by={m.owned_by}")
        model = args.model or pick_model(models, "chat")
        emb_model = args.embedding_model or pick_model(models, "embedding")
        if need_chat and model is None:
            print("error: the server lists no chat model; pass --model", file=sys.stderr)
            return 1
        if "chat" in args.steps:
            print(f"\n== chat ({model})")
            chat(client, model, args.prompt, args.max_tokens)
        if "stream" in args.steps:
            print(f"\n== streaming chat ({model})")
            stream(client, model, args.prompt, args.max_tokens)
        if "tools" in args.steps:
            print(f"\n== tool call ({model})")
            try:
                tools(client, model, args.max_tokens)
            except openai.BadRequestError as e:  # a model without tool support answers 400: report it and go on
                print(f"  skipped: {explain_status(e, args.base_url)}")
        if "embeddings" in args.steps:
            if emb_model is None:
                print("\n== embeddings skipped: no embedding model listed; pass --embedding-model")
            else:
                print(f"\n== embeddings ({emb_model})")
                embeddings(client, emb_model, args.encoding_format)
    except openai.APITimeoutError:  # a subclass of APIConnectionError, so it comes first
        print(
            f"\nerror: no answer from {args.base_url} within {args.timeout:g} s. The server may be busy or slow\n"
            "  (CPU-only?): raise --timeout or lower --max-tokens.",
            file=sys.stderr,
        )
        return 2
    except openai.APIConnectionError as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        print(
            f"\nerror: cannot reach {args.base_url}: {e.message}{cause}\n"
            "  Is the server running (python -m server) and, for a remote box, is the SSH tunnel open?",
            file=sys.stderr,
        )
        return 2
    except openai.APIStatusError as e:
        print(f"\nerror: {explain_status(e, args.base_url)}", file=sys.stderr)
        return 1
    except openai.APIError as e:  # e.g. an error event in the middle of a stream
        print(f"\nerror: the server reported an error: {error_text(e.body) or e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
