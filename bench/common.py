"""Pure helpers shared by the benchmark scripts: prompts, SSE parsing, statistics, tables.

Nothing here does I/O or imports heavy libraries, so it is cheap to unit-test.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------- prompts

SUBJECTS = (
    "a lighthouse keeper", "a retired astronaut", "a curious fox", "a lost robot", "a young baker",
    "an old fisherman", "a street musician", "a clockmaker", "a tired dragon", "a library cat",
    "a shy giant", "a desert nomad", "a mountain guide", "a night nurse", "a chess prodigy",
    "a beekeeper", "a ship's cook", "a forgetful wizard", "a train conductor", "a city gardener",
    "a marathon runner", "a museum guard", "a traveling painter", "a submarine pilot", "a village teacher",
)  # fmt: skip
SETTINGS = (
    "in a flooded city", "on a frozen lake", "during a summer storm", "at the edge of a forest",
    "inside a quiet train station", "on the last day of winter", "in a crowded market", "under a red moon",
    "on a small island", "in an abandoned factory", "at a midnight festival", "on a windy hill",
    "in a hidden valley", "aboard a cargo ship", "in a busy hospital", "near an old bridge",
)  # fmt: skip
TWISTS = (
    "who finds a mysterious letter", "who must keep a promise", "who loses an important key",
    "who meets a stranger with a map", "who hears a song nobody else can hear", "who has one hour left",
    "who discovers a secret door", "who is searching for a missing friend", "who learns to trust again",
    "who receives an unexpected gift", "who has to make a difficult choice", "who remembers a forgotten name",
)  # fmt: skip
WORDS = (
    "the", "a", "river", "light", "morning", "stone", "window", "quiet", "garden", "paper", "music", "road",
    "bright", "cold", "warm", "slowly", "quickly", "house", "voice", "shadow", "bread", "coffee", "letter",
    "door", "street", "evening", "rain", "snow", "wind", "sky", "friend", "story", "memory", "dream", "tree",
    "field", "small", "large", "green", "blue", "golden", "silver", "old", "new", "long", "short", "near",
    "far", "open", "closed", "heavy", "gentle", "and", "with", "under", "over", "through", "across", "before",
    "after", "while", "because", "never", "always", "sometimes", "remember", "walk", "carry", "listen",
    "watch", "build", "write", "sing", "wait", "follow", "return", "forget", "believe", "promise", "candle",
    "harbor", "mountain", "valley", "market", "lantern", "bridge", "clock", "train", "island", "forest",
    "ocean", "village", "city", "journey", "secret", "moment", "season", "careful", "strange", "familiar",
)  # fmt: skip


def generate_prompts(num_prompts: int, input_len: int, seed: int = 0) -> list[str]:
    """`num_prompts` distinct English prompts of about `input_len` words each, deterministic from `seed`.

    Each prompt starts with its own instruction (a numbered story request), so no two prompts share a long
    prefix and prefix caching cannot make a run look faster than it is.
    """
    if num_prompts < 0:
        raise ValueError("num_prompts must be >= 0")
    rng = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < num_prompts:
        i = len(prompts)
        head = (
            f"Story {i + 1}: write a short story about {rng.choice(SUBJECTS)} "
            f"{rng.choice(SETTINGS)} {rng.choice(TWISTS)}."
        )
        words_left = max(0, input_len - len(head.split()) - 4)
        filler = " ".join(rng.choice(WORDS) for _ in range(words_left))
        prompt = f"{head} Use these notes: {filler}." if filler else head
        if prompt not in seen:  # the story number already makes it unique; belt and braces
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def poisson_delays(num: int, request_rate: float, seed: int = 0) -> list[float]:
    """Inter-arrival gaps (s) for a Poisson process of `request_rate` req/s; all zeros for inf."""
    if request_rate <= 0:
        raise ValueError("request_rate must be > 0")
    if math.isinf(request_rate):
        return [0.0] * num
    rng = random.Random(seed + 1)
    return [rng.expovariate(request_rate) for _ in range(num)]


# --------------------------------------------------------------------------- parsing


def parse_int_list(value: str | int | Sequence[int]) -> list[int]:
    """`"1,4,16"` -> [1, 4, 16]. Rejects values < 1."""
    if isinstance(value, int):
        items = [value]
    elif isinstance(value, str):
        items = [int(part) for part in value.replace(" ", "").split(",") if part]
    else:
        items = [int(v) for v in value]
    if not items or any(v < 1 for v in items):
        raise ValueError(f"expected positive integers, got {value!r}")
    return items


SSE_DONE = "[DONE]"


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """One line of an OpenAI-style event stream.

    Returns the decoded JSON object for `data: {...}`, `SSE_DONE` for `data: [DONE]`, and None for
    anything else (blank keep-alive lines, `: comments`, `event:`/`id:`/`retry:` fields, empty data).
    Raises ValueError for a data line that is not JSON.
    """
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    payload = line[5:]
    if payload.startswith(" "):
        payload = payload[1:]
    payload = payload.strip()
    if not payload:
        return None
    if payload == SSE_DONE:
        return SSE_DONE
    obj = json.loads(payload)
    if not isinstance(obj, dict):
        raise ValueError(f"SSE data is not a JSON object: {payload[:200]!r}")
    return obj


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text a chat-completion chunk carries (content, plus reasoning for thinking models)."""
    out = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        for key in ("content", "reasoning_content", "reasoning"):
            value = delta.get(key)
            if isinstance(value, str) and value:
                out.append(value)
        text = choice.get("text")  # legacy /v1/completions chunks
        if isinstance(text, str) and text:
            out.append(text)
    return "".join(out)


EMBEDDING_HINTS = ("embed", "minilm", "bge", "e5-", "gte-", "mpnet", "sentence", "rerank")


def _is_embedding_card(card: dict[str, Any]) -> bool:
    """A /v1/models entry for an embedding model: glm-serve says so in `kind`; others by name."""
    kind = card.get("kind") or card.get("type")
    if isinstance(kind, str) and kind:
        return "embed" in kind.lower()
    return any(hint in str(card["id"]).lower() for hint in EMBEDDING_HINTS)


def _cards(models_payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in models_payload.get("data") or () if isinstance(m, dict) and m.get("id")]


def pick_chat_model(models_payload: dict[str, Any]) -> str | None:
    """The first model of a GET /v1/models answer that is not an embedding model."""
    return next((c["id"] for c in _cards(models_payload) if not _is_embedding_card(c)), None)


def pick_embedding_model(models_payload: dict[str, Any]) -> str | None:
    """The first embedding model of a GET /v1/models answer."""
    return next((c["id"] for c in _cards(models_payload) if _is_embedding_card(c)), None)


# --------------------------------------------------------------------------- statistics


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default); nan when empty."""
    data = sorted(values)
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    frac = pos - lo
    return data[lo] + (data[hi] - data[lo]) * frac


def summarize_ms(values_s: Sequence[float], percentiles: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """mean/std/median/pXX of durations given in seconds, reported in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    if ms:
        mean = sum(ms) / len(ms)
        std = math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms))
    else:
        mean = std = math.nan
    out = {"mean": mean, "std": std, "median": percentile(ms, 50)}
    for p in percentiles:
        out[f"p{p:g}"] = percentile(ms, p)
    return out


@dataclass
class RequestResult:
    """What one streamed request measured. Times are in seconds."""

    success: bool = False
    status: int | None = None  # HTTP status, None for connection errors/timeouts
    error: str = ""
    start: float = 0.0  # perf_counter when sent
    ttft: float = 0.0  # first generated text
    e2e: float = 0.0  # last byte
    itl: list[float] = field(default_factory=list)  # gaps between text-carrying chunks
    output_tokens: int = 0
    prompt_tokens: int = 0
    chunks: int = 0  # text-carrying chunks received
    usage_reported: bool = False

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def compute_metrics(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    """Aggregate one run (one concurrency level) the way `vllm bench serve` does."""
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    rate_limited = sum(1 for r in failed if r.status == 429)
    total_out = sum(r.output_tokens for r in ok)
    total_in = sum(r.prompt_tokens for r in ok)
    duration = max(duration, 1e-9)
    errors: dict[str, int] = {}
    for r in failed:
        key = f"{r.status}: {r.error}"[:160] if r.status else r.error[:160]
        errors[key] = errors.get(key, 0) + 1
    return {
        "completed": len(ok),
        "failed": len(failed),
        "rate_limited": rate_limited,
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "input_tokens_from_usage": all(r.usage_reported for r in ok) if ok else False,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "ttft_ms": summarize_ms([r.ttft for r in ok]),
        "tpot_ms": summarize_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": summarize_ms([gap for r in ok for gap in r.itl]),
        "e2el_ms": summarize_ms([r.e2e for r in ok]),
        "errors": errors,
    }


def json_safe(obj: Any) -> Any:
    """Replace nan/inf floats by None so the result is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- tables

_WIDTH = 50


def _rule(title: str = "", char: str = "-") -> str:
    return f" {title} ".center(_WIDTH, char) if title else char * _WIDTH


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.2f}"
    else:
        text = str(value)
    return f"{label:<{_WIDTH - 12}}{text:>12}"


def format_result_table(metrics: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """A block like vllm's `Serving Benchmark Result` for one run."""
    lines = [_rule(title, "=")]
    lines.append(_row("Successful requests:", metrics["completed"]))
    lines.append(_row("Failed requests:", metrics["failed"]))
    if metrics.get("rate_limited"):
        lines.append(_row("  of which 429 (rate limited):", metrics["rate_limited"]))
    if "max_concurrency" in metrics:
        lines.append(_row("Maximum request concurrency:", metrics["max_concurrency"]))
    if "request_rate" in metrics:
        lines.append(_row("Request rate (req/s):", metrics["request_rate"]))
    lines.append(_row("Benchmark duration (s):", metrics["duration_s"]))
    lines.append(_row("Total input tokens:", metrics["total_input_tokens"]))
    lines.append(_row("Total generated tokens:", metrics["total_output_tokens"]))
    lines.append(_row("Request throughput (req/s):", metrics["request_throughput"]))
    lines.append(_row("Output token throughput (tok/s):", metrics["output_throughput"]))
    lines.append(_row("Total token throughput (tok/s):", metrics["total_token_throughput"]))
    for key, name, short in (
        ("ttft_ms", "Time to First Token", "TTFT"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl_ms", "Inter-token Latency", "ITL"),
        ("e2el_ms", "End-to-end Latency", "E2EL"),
    ):
        stats = metrics[key]
        lines.append(_rule(name))
        lines.append(_row(f"Mean {short} (ms):", stats["mean"]))
        lines.append(_row(f"Median {short} (ms):", stats["median"]))
        for p in ("p90", "p99"):
            if p in stats:
                lines.append(_row(f"P{p[1:]} {short} (ms):", stats[p]))
    lines.append("=" * _WIDTH)
    if metrics.get("errors"):
        lines.append("Errors:")
        lines.extend(f"  {count} x {err}" for err, count in metrics["errors"].items())
    return "\n".join(lines)


def format_sweep_table(runs: Sequence[dict[str, Any]]) -> str:
    """One line per run: the numbers you compare across concurrency levels and servers."""
    header = (
        f"{'label':<20} {'conc':>5} {'ok':>5} {'fail':>5} {'req/s':>7} {'out tok/s':>10} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'ITL p50':>8} {'E2E p50':>9}"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        m = run["metrics"]
        lines.append(
            f"{str(run.get('label', ''))[:20]:<20} {run['config']['max_concurrency']:>5} {m['completed']:>5} "
            f"{m['failed']:>5} {m['request_throughput']:>7.2f} {m['output_throughput']:>10.1f} "
            f"{m['ttft_ms']['median']:>9.1f} {m['ttft_ms']['p99']:>9.1f} {m['tpot_ms']['median']:>9.1f} "
            f"{m['itl_ms']['median']:>8.1f} {m['e2el_ms']['median']:>9.1f}"
        )
    lines.append("(latencies in ms)")
    return "\n".join(lines)
