"""Unit tests for the pure helpers of the benchmark scripts (bench/common.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` is not an installed package

from bench.common import (  # noqa: E402
    SSE_DONE,
    RequestResult,
    chunk_text,
    compute_metrics,
    format_result_table,
    format_sweep_table,
    generate_prompts,
    json_safe,
    parse_int_list,
    parse_sse_line,
    percentile,
    pick_chat_model,
    pick_embedding_model,
    poisson_delays,
    summarize_ms,
)


# --------------------------------------------------------------------------- percentiles
def test_percentile_matches_numpy_linear_interpolation():
    data = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(data, 0) == 15.0
    assert percentile(data, 100) == 50.0
    assert percentile(data, 50) == 35.0
    assert percentile(data, 40) == pytest.approx(29.0)  # numpy.percentile(data, 40) == 29.0
    assert percentile(data, 90) == pytest.approx(46.0)
    assert percentile(data, 99) == pytest.approx(49.6)


def test_percentile_unsorted_single_and_empty():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_ms_converts_seconds():
    stats = summarize_ms([0.1, 0.2, 0.3])
    assert stats["mean"] == pytest.approx(200.0)
    assert stats["median"] == pytest.approx(200.0)
    assert stats["p99"] == pytest.approx(298.0)
    assert set(stats) == {"mean", "std", "median", "p50", "p90", "p99"}
    assert math.isnan(summarize_ms([])["mean"])


# --------------------------------------------------------------------------- prompts
def test_prompts_deterministic_distinct_and_sized():
    a = generate_prompts(50, 120, seed=3)
    assert a == generate_prompts(50, 120, seed=3)
    assert a != generate_prompts(50, 120, seed=4)
    assert len(set(a)) == 50
    for prompt in a:
        assert abs(len(prompt.split()) - 120) <= 5
        assert prompt.isascii()
    # distinct already in the first few words: no shared prefix for a prefix cache to exploit
    assert len({" ".join(p.split()[:2]) for p in a}) == 50


def test_prompts_prefix_stable_and_short():
    assert generate_prompts(10, 60, seed=1)[:5] == generate_prompts(5, 60, seed=1)
    short = generate_prompts(3, 1, seed=0)
    assert len(set(short)) == 3 and all(p.startswith("Story ") for p in short)
    assert generate_prompts(0, 10) == []


def test_poisson_delays():
    assert poisson_delays(4, math.inf) == [0.0] * 4
    d = poisson_delays(2000, 10.0, seed=5)
    assert d == poisson_delays(2000, 10.0, seed=5)
    assert sum(d) / len(d) == pytest.approx(0.1, rel=0.1)
    with pytest.raises(ValueError):
        poisson_delays(1, 0)


def test_parse_int_list():
    assert parse_int_list("1,4,16") == [1, 4, 16]
    assert parse_int_list(" 8 ") == [8]
    assert parse_int_list(2) == [2]
    for bad in ("", "0", "1,-2"):
        with pytest.raises(ValueError):
            parse_int_list(bad)


# --------------------------------------------------------------------------- SSE
def test_parse_sse_line():
    chunk = {"choices": [{"delta": {"content": "Hi"}, "index": 0}]}
    assert parse_sse_line("data: " + json.dumps(chunk)) == chunk
    assert parse_sse_line("data:" + json.dumps(chunk) + "\r\n") == chunk  # no space after the colon is legal
    assert parse_sse_line("data: [DONE]") == SSE_DONE
    assert parse_sse_line("data:[DONE]") == SSE_DONE
    for ignored in ("", ": ping", "event: message", "id: 3", "retry: 100", "data: ", "data:"):
        assert parse_sse_line(ignored) is None
    with pytest.raises(ValueError):
        parse_sse_line("data: {not json")
    with pytest.raises(ValueError):
        parse_sse_line("data: [1, 2]")


def test_chunk_text():
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert chunk_text({"choices": [{"delta": {"content": "a"}}]}) == "a"
    assert chunk_text({"choices": [{"delta": {"reasoning_content": "r", "content": None}}]}) == "r"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""
    assert chunk_text({"choices": [{"text": "legacy"}]}) == "legacy"


def test_pick_models():
    payload = {"data": [{"id": "all-MiniLM-L6-v2"}, {"id": "SmolLM2-135M-Instruct"}, {"id": "bge-m3"}]}
    assert pick_chat_model(payload) == "SmolLM2-135M-Instruct"
    assert pick_embedding_model(payload) == "all-MiniLM-L6-v2"
    assert pick_chat_model({"data": []}) is None
    assert pick_chat_model({}) is None
    # glm-serve's cards say what they are
    cards = {"data": [{"id": "text-embedding-ada-002", "kind": "chat"}, {"id": "my-encoder", "kind": "embedding"}]}
    assert pick_chat_model(cards) == "text-embedding-ada-002"
    assert pick_embedding_model(cards) == "my-encoder"


# --------------------------------------------------------------------------- metrics
def _ok(ttft, e2e, tokens, itl, prompt=10):
    return RequestResult(
        success=True, status=200, ttft=ttft, e2e=e2e, output_tokens=tokens, prompt_tokens=prompt, itl=itl
    )


def test_compute_metrics_and_tables():
    results = [
        _ok(0.1, 1.1, 11, [0.1] * 10),
        _ok(0.3, 2.3, 21, [0.1] * 20),
        RequestResult(success=False, status=429, error="overloaded"),
        RequestResult(success=False, status=None, error="ReadTimeout"),
    ]
    m = compute_metrics(results, duration=2.0)
    assert (m["completed"], m["failed"], m["rate_limited"]) == (2, 2, 1)
    assert m["total_output_tokens"] == 32 and m["total_input_tokens"] == 20
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(16.0)
    assert m["total_token_throughput"] == pytest.approx(26.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert m["tpot_ms"]["mean"] == pytest.approx(100.0)  # (1.1-0.1)/10 and (2.3-0.3)/20
    assert m["itl_ms"]["median"] == pytest.approx(100.0)
    assert m["e2el_ms"]["p50"] == pytest.approx(1700.0)
    assert sum(m["errors"].values()) == 2

    m["max_concurrency"] = 4
    table = format_result_table(m, "x")
    assert "Successful requests:" in table and "Median TTFT (ms):" in table and "P99 ITL (ms):" in table
    assert "429" in table
    sweep = format_sweep_table([{"label": "a", "config": {"max_concurrency": 4}, "metrics": m}])
    assert "16.0" in sweep


def test_tpot_needs_two_tokens_and_all_failed_is_nan_safe():
    assert _ok(0.1, 0.2, 1, []).tpot is None
    m = compute_metrics([RequestResult(error="boom")], duration=1.0)
    assert m["completed"] == 0 and math.isnan(m["ttft_ms"]["mean"])
    strict = json.dumps(json_safe(m), allow_nan=False)
    assert '"mean": null' in strict
    format_result_table({**m, "max_concurrency": 1})
