"""The wire format of vLLM's token-in/token-out API (`--tokens-only`): our request -> its JSON, its SSE -> chunks.

Verified against vLLM 0.32 (entrypoints/scale_out/token_in_token_out) and a running server:
- POST /inference/v1/generate {"request_id", "token_ids", "sampling_params", "stream", "model"}; vLLM prefixes
  the id, so the id to abort is "generate-tokens-<request_id>" (POST /inference/v1/abort_requests
  {"request_ids": [...]}; it answers 200 at once and aborts in the background).
- Streamed: `data: {"choices": [{"token_ids": [...], "finish_reason": null|"stop"|"length"|"abort"|"error",
  "stop_reason": <id>|null}]}` per step, then `data: [DONE]`; an error inside the stream is
  `data: {"error": {"message", "type", "code"}}`. Errors before the first byte are plain JSON with a status.
- The stop token that ended a sequence is the last id of its chunk (stop_reason = that id).
- With ignore_eos=false vLLM also stops on the model's own eos and generation_config eos ids; with
  ignore_eos=true only `stop_token_ids` end generation. The serving layer owns the stop list, so we always send
  ignore_eos=true plus our ids.
- Stop *strings* are refused on a --tokens-only server (400); they are cut above the seam anyway.
- max_tokens must be >= 1 (400 otherwise); top_k 0 means off (as ours); temperature 0 is greedy.
- `logprobs: k` adds `choices[].logprobs.content[]`, one per token id: {"token_id", "logprob", "rank",
  "top_logprobs": [{"token_id", "logprob", "rank"}]}, values from the raw model distribution (vLLM's default
  --logprobs-mode raw_logprobs: before logit_bias, penalties, temperature and allowed_token_ids). The top list is
  the sampled token first, then the others by rank, cut to k entries: so the k-th most likely is missing when the
  sampled token ranks below k. We ask for k + 1 and keep ranks 1..k.
- `logit_bias` is {"<id>": bias}; vLLM clamps it to -100..100 and range-checks the ids.
"""

from __future__ import annotations

from typing import Any

import orjson

from server.backends.base import BackendFinish, StepLogprobs, TokenChunk
from server.backends.child.client import error_message
from server.backends.child.stream import UpstreamError
from server.types import SamplingParams

GENERATE_PATH = "/inference/v1/generate"
ABORT_PATH = "/inference/v1/abort_requests"
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for top_logprobs
UPSTREAM_ID_PREFIX = "generate-tokens-"  # what vLLM puts before our request_id (serving.py, serve_tokens)

_FINISH: dict[str, BackendFinish] = {"stop": "stop", "length": "length", "abort": "abort"}


def sampling_params(
    sampling: SamplingParams,
    *,
    max_tokens: int,
    stop_token_ids: set[int],
    allowed_token_ids: list[int] | None = None,
    grammar: str | None = None,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": max(sampling.temperature, 0.0),
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,  # 0 = off in both
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "repetition_penalty": sampling.repetition_penalty,
        # Only OUR stop ids end a sequence: without ignore_eos vLLM would add the checkpoint's eos ids.
        "ignore_eos": True,
        "stop_token_ids": sorted(stop_token_ids),
        "detokenize": False,
    }
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    if allowed_token_ids is not None:
        params["allowed_token_ids"] = allowed_token_ids
    if grammar is not None:  # EBNF from server/structured; vLLM's xgrammar backend compiles it for its vocabulary
        params["structured_outputs"] = {"grammar": grammar}
    if sampling.logit_bias:
        params["logit_bias"] = {str(k): v for k, v in sampling.logit_bias.items()}
    if sampling.logprobs is not None:
        params["logprobs"] = sampling.logprobs + 1
    return params


def generate_body(
    request_id: str,
    token_ids: list[int],
    params: dict[str, Any],
    *,
    model: str | None,
    stream: bool,
) -> bytes:
    body: dict[str, Any] = {"request_id": request_id, "token_ids": token_ids, "sampling_params": params,
                            "stream": stream}
    if model:
        body["model"] = model  # a LoRA adapter's name; absent: the base model
    return orjson.dumps(body)


def parse_event(line: str, logprobs: int | None = None) -> TokenChunk | None:
    """One SSE line -> a chunk; None for keep-alives, blank lines and the final `[DONE]`."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    event = orjson.loads(data)
    if "error" in event:
        raise UpstreamError(error_message(event))
    choices = event.get("choices") or []
    if not choices:
        return None  # a usage-only chunk
    return choice_chunk(choices[0], logprobs)


def choice_chunk(choice: dict[str, Any], logprobs: int | None = None) -> TokenChunk:
    """`logprobs`: the k the request asked for (None: it asked for none)."""
    reason = choice.get("finish_reason")
    if reason is not None and reason not in _FINISH:  # "error" (vLLM sends it as an error event too), or unknown
        raise UpstreamError(f"vLLM ended the sequence with finish_reason {reason!r}")
    ids = list(choice.get("token_ids") or [])
    steps = None
    if logprobs is not None:
        content = (choice.get("logprobs") or {}).get("content") or []
        if len(content) != len(ids):
            raise UpstreamError(f"vLLM sent {len(content)} logprobs for {len(ids)} tokens")
        steps = [step_logprobs(entry, logprobs) for entry in content]
    return TokenChunk(ids, _FINISH[reason] if reason is not None else None, steps)


def step_logprobs(entry: dict[str, Any], k: int) -> StepLogprobs:
    top = sorted(((t["token_id"], t["logprob"]) for t in entry.get("top_logprobs") or []
                  if t.get("rank") is not None and t["rank"] <= k), key=lambda t: -t[1])
    return StepLogprobs(entry["logprob"], top[:k])
