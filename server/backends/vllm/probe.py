"""What a running vLLM server is: reachable, ready, serving the token-in/token-out API, which model and context.

Used once the child is ready (launch mode) or at start-up against VLLM_URL (connect mode). The checks are the
cheapest real ones: /health, /v1/models, /version, /metrics, and a one-token generate on token id 0.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import httpx

from server.backends.child.client import error_message
from server.backends.vllm.wire import GENERATE_PATH
from server.errors import ConfigError

log = logging.getLogger("glm_serve.vllm")


@dataclass
class ServerInfo:
    model: str  # vLLM's served model name of the base model
    max_model_len: int
    version: str
    lora: list[str] = field(default_factory=list)  # adapter names vLLM has loaded
    kv_cache_bytes: int | None = None
    tokenizer_loaded: bool = False  # True: not --tokens-only (works, but vLLM detokenizes for nothing)


async def server_info(client: httpx.AsyncClient, base_url: str, *, where: str) -> ServerInfo:
    """Everything we need from a ready vLLM; ConfigError saying what is wrong with it otherwise."""
    try:
        models = (await client.get(f"{base_url}/v1/models", timeout=30)).json()["data"]
        base = next(m for m in models if not m.get("parent"))
        version = (await client.get(f"{base_url}/version", timeout=30)).json().get("version", "unknown")
        probe = await client.post(f"{base_url}{GENERATE_PATH}", timeout=120, json={
            "token_ids": [0], "stream": False,
            "sampling_params": {"max_tokens": 1, "temperature": 0, "ignore_eos": True, "detokenize": False}})
        tokenize = await client.post(f"{base_url}/tokenize", json={"prompt": "a"}, timeout=30)
        metrics = await client.get(f"{base_url}/metrics", timeout=30)
    except (httpx.HTTPError, ValueError, KeyError, StopIteration) as exc:
        raise ConfigError(f"{where} does not answer like a vLLM server: {type(exc).__name__}: {exc}") from None
    if probe.status_code in (403, 404):
        raise ConfigError(
            f"{where} is vLLM {version} without the token-in/token-out API (POST {GENERATE_PATH} answered "
            f"{probe.status_code}: {error_message(_json(probe))}). Start it with --tokens-only "
            "(vLLM >= 0.32): glm-serve renders and tokenizes ChatGLM3 prompts itself.")
    if probe.status_code != 200:
        raise ConfigError(f"{where}: a one-token test generation failed ({probe.status_code}: "
                          f"{error_message(_json(probe))})")
    return ServerInfo(
        model=base["id"],
        max_model_len=int(base.get("max_model_len") or 0),
        version=version,
        lora=[m["id"] for m in models if m.get("parent")],
        kv_cache_bytes=_kv_cache_bytes(metrics.text),
        tokenizer_loaded=tokenize.status_code == 200,
    )


async def running_requests(client: httpx.AsyncClient, base_url: str) -> tuple[float, float]:
    """vLLM's own gauges (vllm:num_requests_running, vllm:num_requests_waiting), summed over engines."""
    text = (await client.get(f"{base_url}/metrics", timeout=10)).text
    return _gauge(text, "vllm:num_requests_running"), _gauge(text, "vllm:num_requests_waiting")


def _gauge(text: str, name: str) -> float:
    return sum(float(m[1]) for m in re.finditer(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))


def _kv_cache_bytes(text: str) -> int | None:
    m = re.search(r'^vllm:cache_config_info\{[^}]*kv_cache_memory_bytes="(\d+)"', text, re.M)
    return int(m[1]) if m else None


def _json(response: httpx.Response):
    try:
        return response.json()
    except ValueError:
        return response.text
