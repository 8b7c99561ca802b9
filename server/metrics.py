"""Prometheus metrics: request outcomes, queue depth, latency histograms, token counts, KV memory."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per app, so several apps in one process (tests) never collide."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("glm_serve_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.running = Gauge("glm_serve_running_requests", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("glm_serve_waiting_requests", "Sequences waiting for a batch slot", registry=r)
        self.kv_bytes = Gauge("glm_serve_kv_cache_bytes", "Bytes held by the running batch's KV cache", registry=r)
        self.ttft = Histogram("glm_serve_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("glm_serve_inter_token_latency_seconds", "Gap between successive tokens of a sequence",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("glm_serve_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("glm_serve_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("glm_serve_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("glm_serve_finished_sequences", "Sequences by finish reason", ["reason"], registry=r)
        self.embedding_batches = Counter("glm_serve_embedding_batches", "Embedding batches (forward passes)",
                                         registry=r)
        self.embedding_texts = Counter("glm_serve_embedding_texts", "Texts embedded", registry=r)
        self.slow_client_aborts = Counter("glm_serve_slow_client_aborts", "Requests aborted because the client "
                                          "stopped reading the answer (STREAM_SEND_TIMEOUT)", registry=r)
        self.memory = Gauge("glm_serve_process_resident_bytes", "Resident memory of the server process", registry=r)

    # -- serving-layer observer (event loop) -------------------------------------------------------
    def on_first_token(self, ttft: float, prompt_tokens: int) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(1)

    def on_tokens(self, n: int, gap: float | None) -> None:
        """`n` more tokens of one sequence arrived, `gap` seconds after its previous ones."""
        if n > 0:
            self.generation_tokens.inc(n)
            if gap is not None:
                self.itl.observe(gap / n)

    def on_finish(self, reason: str, e2e: float) -> None:
        self.finished.labels(reason).inc()
        self.e2e.observe(e2e)

    def on_embedding_batch(self, texts: int) -> None:
        self.embedding_batches.inc()
        self.embedding_texts.inc(texts)

    def render(self, capacity=None) -> tuple[bytes, str]:
        """`capacity`: the backend's Capacity now (gauges are read at scrape time, whatever the backend)."""
        if capacity is not None:
            self.running.set(capacity.running)
            self.waiting.set(capacity.waiting)
            if capacity.kv_cache_bytes is not None:
                self.kv_bytes.set(capacity.kv_cache_bytes)
        self.memory.set(_rss_bytes())
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
