"""One small interface over glm-serve (or any OpenAI/ZhipuAI-compatible endpoint) for application code.

    from clients.remote_llm import ChatGLM3, ChatGPT

    llm = ChatGLM3()                                  # zhipuai SDK; ChatGPT() is the same over the openai SDK
    print(llm.chat([{"role": "user", "content": "你好"}], temperature=0.7))
    for piece in llm.stream("Tell me a joke"):       # a plain string is one user message
        print(piece, end="", flush=True)
    vectors = llm.embed(["first text", "second text"])

Settings: constructor arguments, else the environment, else a `.env` (current directory, then the repo root):
    ZHIPU_API_KEY, ZHIPU_BASE_URL     for ChatGLM3
    OPENAI_API_KEY, OPENAI_BASE_URL   for ChatGPT
Without a model name each class uses the first chat / embedding model that /v1/models lists
(production aliases such as "chatglm3-6b" or "gpt-3.5-turbo" can be passed explicitly).

Demo:  python -m clients.remote_llm [--base-url http://127.0.0.1:6006/v1] [--backend glm|gpt|both]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dotenv import find_dotenv, load_dotenv

DEFAULT_BASE_URL = "http://127.0.0.1:6006/v1"
# zhipuai needs a key shaped "id.secret": with JWT signing on it splits the key at the dot to sign a token
# and fails locally otherwise (ChatGLM3's own demos pass "EMP.TY" for the same reason). A server started
# without API_KEYS ignores the value, so any well-shaped placeholder works.
ZHIPU_PLACEHOLDER_KEY = "glm-serve.local-secret"
# The openai SDK refuses to start without some key.
OPENAI_PLACEHOLDER_KEY = "sk-no-key-required"

Messages = str | list[dict[str, Any]]


class RemoteLLMError(RuntimeError):
    """A failed call in plain words; status_code is the HTTP status when the server answered with an error."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


def _load_env() -> None:
    # Variables already in the environment win; the current directory's .env wins over the repo's.
    load_dotenv(find_dotenv(usecwd=True))
    load_dotenv(Path(__file__).resolve().parent.parent / ".env")


def _error_text(body: object) -> str:
    """The message of an OpenAI-style {"error": {"message": ...}} body (or FastAPI's {"detail": ...})."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner.get("detail") or inner)
        return str(body.get("detail") or inner)
    return str(body or "")


def _as_messages(messages: Messages) -> list[dict[str, Any]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


class RemoteLLM(ABC):
    """chat() returns the answer text, stream() yields text pieces, embed() returns one vector per text.

    Extra keyword arguments (temperature, max_tokens, tools, ...) go to the SDK's create() call.
    Every failure is raised as RemoteLLMError; the underlying SDK client is `self.client`.
    """

    def __init__(self, model: str | None = None, embedding_model: str | None = None):
        self._model = model
        self._embedding_model = embedding_model

    # Both SDKs share the shape of chat.completions.create; they differ in errors, stream closing and embeddings.
    def chat(self, messages: Messages, **kw: Any) -> str:
        with self._errors():
            resp = self.client.chat.completions.create(model=self.model, messages=_as_messages(messages), **kw)
        return resp.choices[0].message.content or ""

    def stream(self, messages: Messages, **kw: Any) -> Iterator[str]:
        with self._errors():
            chunks = self.client.chat.completions.create(
                model=self.model, messages=_as_messages(messages), stream=True, **kw
            )
            try:
                for chunk in chunks:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield choice.delta.content
            finally:
                # A caller that stops early closes the connection, which lets the server stop generating.
                self._close(chunks)

    @abstractmethod
    def embed(self, texts: list[str]) -> list[list[float]]: ...

    @abstractmethod
    def _errors(self) -> contextlib.AbstractContextManager[None]:
        """Turns the SDK's exceptions into RemoteLLMError."""

    @abstractmethod
    def _close(self, chunks: Any) -> None:
        """Closes a stream returned by create(stream=True)."""

    @abstractmethod
    def _list_models(self) -> list[dict[str, Any]]:
        """The `data` entries of GET /v1/models."""

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self._pick("chat")
        return self._model

    @property
    def embedding_model(self) -> str:
        if self._embedding_model is None:
            self._embedding_model = self._pick("embedding")
        return self._embedding_model

    def _pick(self, kind: str) -> str:
        # Entries tagged with "kind" (chat|embedding) are matched by it. Untagged lists are taken in
        # glm-serve's order: chat models (and aliases) first, the embedding model last.
        models = self._list_models()
        ids = [m["id"] for m in models]
        if any(m.get("kind") for m in models):
            ids = [m["id"] for m in models if (m.get("kind") == "embedding") == (kind == "embedding")]
        elif kind == "embedding":
            ids = ids[-1:] if len(ids) > 1 else []
        if not ids:
            raise RemoteLLMError(f"the server lists no {kind} model; pass the model name explicitly")
        return ids[0]


class ChatGLM3(RemoteLLM):
    """glm-serve through the zhipuai SDK (v2), the way ChatGLM3 / Zhipu API users call it.

    sign_jwt=False (the SDK default) sends the key itself as a Bearer token; True sends a short-lived
    HS256 JWT signed with the secret part of an "id.secret" key instead. zhipuai's create() accepts
    fewer keywords than openai's (no presence_penalty, n, ...): pass those as extra_body={...}.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str | None = None,
        embedding_model: str | None = None,
        *,
        sign_jwt: bool = False,
        timeout: float = 300.0,
        max_retries: int = 1,
    ):
        import zhipuai

        _load_env()
        super().__init__(model, embedding_model)
        self._sdk = zhipuai
        api_key = api_key or os.getenv("ZHIPU_API_KEY") or ZHIPU_PLACEHOLDER_KEY
        if sign_jwt and api_key.count(".") != 1:
            raise RemoteLLMError("sign_jwt needs a ZHIPU_API_KEY shaped like id.secret")
        # zhipuai 2.1.5 adds a missing trailing slash itself; keep one anyway, as ChatGLM3's demos do.
        self.base_url = (base_url or os.getenv("ZHIPU_BASE_URL") or DEFAULT_BASE_URL).rstrip("/") + "/"
        self.client = zhipuai.ZhipuAI(
            api_key=api_key,
            base_url=self.base_url,
            timeout=timeout,
            max_retries=max_retries,
            # True (the SDK default) sends the key as a plain Bearer token; False signs a short-lived JWT.
            disable_token_cache=not sign_jwt,
        )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        z = self._sdk
        try:
            yield
        # Timeouts and connection errors first: both are subclasses of APIResponseError.
        except z.APITimeoutError as e:
            raise RemoteLLMError(f"no answer from {self.base_url} in time (raise timeout=...)") from e
        except z.APIConnectionError as e:
            raise RemoteLLMError(f"cannot reach {self.base_url}: {e.__cause__ or e.message}") from e
        except z.APIStatusError as e:
            try:
                body = e.response.json()
            except ValueError:
                body = e.response.text.strip()
            raise RemoteLLMError(f"HTTP {e.status_code}: {_error_text(body)}", e.status_code) from e
        except z.APIResponseError as e:  # an error event inside a stream
            raise RemoteLLMError(f"server error: {_error_text(e.json_data) or e.message}") from e
        except z.ZhipuAIError as e:
            raise RemoteLLMError(str(e)) from e

    def _list_models(self) -> list[dict[str, Any]]:
        with self._errors():
            # The SDK has no models API; its generic get() still sends our auth headers.
            data = self.client.get("/models", cast_type=object)
        return data.get("data", []) if isinstance(data, dict) else []

    # Note: zhipuai rewrites temperature <= 0 to 0.01 + do_sample=False, and temperature / top_p >= 1 to 0.99.
    def _close(self, chunks: Any) -> None:
        chunks.response.close()

    def embed(self, texts: list[str]) -> list[list[float]]:
        with self._errors():
            resp = self.client.embeddings.create(model=self.embedding_model, input=list(texts))
        return [d.embedding for d in sorted(resp.data, key=lambda d: d.index or 0)]


class ChatGPT(RemoteLLM):
    """glm-serve (or any OpenAI-compatible server) through the openai SDK."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str | None = None,
        embedding_model: str | None = None,
        *,
        timeout: float = 300.0,
        max_retries: int = 1,
    ):
        import openai

        _load_env()
        super().__init__(model, embedding_model)
        self._sdk = openai
        self.base_url = base_url or os.getenv("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        self.client = openai.OpenAI(
            api_key=api_key or os.getenv("OPENAI_API_KEY") or OPENAI_PLACEHOLDER_KEY,
            base_url=self.base_url,
            timeout=timeout,
            max_retries=max_retries,
        )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        o = self._sdk
        try:
            yield
        except o.APITimeoutError as e:
            raise RemoteLLMError(f"no answer from {self.base_url} in time (raise timeout=...)") from e
        except o.APIConnectionError as e:
            raise RemoteLLMError(f"cannot reach {self.base_url}: {e.__cause__ or e.message}") from e
        except o.APIStatusError as e:
            raise RemoteLLMError(f"HTTP {e.status_code}: {_error_text(e.body) or e.message}", e.status_code) from e
        except o.OpenAIError as e:  # an error event inside a stream, a malformed answer
            raise RemoteLLMError(str(e)) from e

    def _list_models(self) -> list[dict[str, Any]]:
        with self._errors():
            return [m.model_dump() for m in self.client.models.list()]

    def _close(self, chunks: Any) -> None:
        chunks.close()

    def embed(self, texts: list[str]) -> list[list[float]]:
        with self._errors():
            # float keeps the wire format obvious; the SDK's default (base64) would also work.
            resp = self.client.embeddings.create(model=self.embedding_model, input=list(texts), encoding_format="float")
        return [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]


def _demo(llm: RemoteLLM) -> None:
    print(f"== {type(llm).__name__}: chat with {llm.model}")
    print(llm.chat([{"role": "user", "content": "用一句话介绍你自己。"}], max_tokens=64))
    print("== stream")
    for piece in llm.stream("Count from 1 to 5.", max_tokens=64):
        print(piece, end="", flush=True)
    print(f"\n== embed with {llm.embedding_model}")
    vectors = llm.embed(["hello world", "你好，世界"])
    print(f"{len(vectors)} vectors of {len(vectors[0])} dimensions\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Demo of the RemoteLLM wrappers against a running glm-serve.")
    p.add_argument(
        "--base-url", help=f"API root for both SDKs (default: *_BASE_URL from env/.env, else {DEFAULT_BASE_URL})"
    )
    p.add_argument("--backend", choices=["glm", "gpt", "both"], default="both")
    args = p.parse_args(argv)
    try:
        if args.backend in ("glm", "both"):
            _demo(ChatGLM3(base_url=args.base_url))
        if args.backend in ("gpt", "both"):
            _demo(ChatGPT(base_url=args.base_url))
    except RemoteLLMError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
