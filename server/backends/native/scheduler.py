"""Continuous batching on one engine thread.

Between two decode steps, waiting sequences are prefilled and join the running batch; finished or
cancelled ones leave it. While others are generating, a prompt longer than `max_prefill_tokens` is
prefilled one chunk per step, so it delays their next tokens by one chunk at a time, not by all of it.
Every sequence keeps its own sampling state, stop tokens and token budget; it works on token ids only
(text, stop strings and tool calls are the serving layer's). Results cross back to the event loop through
`publish`: a newcomer's first token as soon as it is sampled, the rest once per step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from server.backends.base import StepLogprobs
from server.backends.native.kv_cache import BatchKV
from server.backends.native.sampling import NonFiniteLogits, Sampler
from server.errors import EngineOverloaded
from server.structured.matcher import SequenceMatcher, apply_masks
from server.types import SamplingParams

log = logging.getLogger("glm_serve.scheduler")


@dataclass
class StepOutput:
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    logprobs: list[StepLogprobs] | None = None  # one per token id, when the sequence asked for them


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_token_ids: set[int]
    sink: Callable[[StepOutput], None]  # called on the event loop thread
    adapter: str | None = None  # peft adapter name
    request_id: str = ""
    forced_prefixes: list[list[int]] = field(default_factory=list)  # the answer starts with one of these
    grammar: SequenceMatcher | None = None  # structured outputs: the answer follows this grammar
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    # engine-thread state, built at admission
    prefilled: int = 0  # prompt tokens already in prefill_cache
    prefill_cache: DynamicCache | None = None
    sampler: Sampler | None = None

    def allowed_next(self) -> list[int]:
        """The tokens that keep the answer on one of `forced_prefixes`; [] once one is complete (or none given)."""
        if not self.forced_prefixes:
            return []
        n, done = len(self.generated), self.generated
        allowed = {p[n] for p in self.forced_prefixes if len(p) > n and p[:n] == done}
        if not allowed or any(p == done for p in self.forced_prefixes):
            self.forced_prefixes = []
            return []
        return sorted(allowed)


class Scheduler:
    def __init__(
        self,
        model,
        *,
        device: torch.device,
        vocab_size: int,
        publish: Callable[[list[tuple[Sequence, StepOutput]]], None],
        max_running: int = 16,
        max_waiting: int = 64,
        max_prefill_tokens: int = 0,
    ):
        self.model = model
        self.device = device
        self.vocab_size = vocab_size
        self.publish = publish
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens  # chunk size for long prompts; 0: whole prompts
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefilling: Sequence | None = None  # admitted, its prompt partly prefilled (chunked prefill)
        self._accepted: set[Sequence] = set()  # submitted and not yet finished: waiting, prefilling or running
        self.kv = BatchKV()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="glm-serve-engine", daemon=True)

    # -- called from the event loop -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if len(self._accepted) >= self.max_running + self.max_waiting:
                raise EngineOverloaded(
                    f"The server is at capacity ({self.num_running} running, {len(self.waiting)} waiting). "
                    "Retry shortly or raise MAX_WAITING_REQUESTS."
                )
            self._accepted.add(seq)
            self.waiting.append(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True  # read by the engine thread before its next step
        with self._cond:
            self._cond.notify()

    @property
    def num_running(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _release(self, seqs: list[Sequence]) -> None:
        if seqs:
            with self._cond:
                self._accepted.difference_update(seqs)

    # -- the engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and not self.running and self.prefilling is None:
                    self._cond.wait()
                if self._stopping:
                    return
            outputs: list[tuple[Sequence, StepOutput]] = []
            try:
                self._drop_cancelled(outputs)
                self._admit(outputs)
                if self.running:
                    self._decode_step(outputs)
            except Exception as exc:  # an engine failure ends the batch, never the server
                log.exception("engine step failed; ending %d running request(s)", len(self.running))
                for seq in self.running:
                    seq.finished = True
                    outputs.append((seq, StepOutput([], "error", error=str(exc))))
                self.running = []
                self.kv = BatchKV()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self._emit(outputs)

    def _emit(self, outputs: list[tuple[Sequence, StepOutput]]) -> None:
        self._release([s for s, out in outputs if out.finish_reason])
        if outputs:
            self.publish(outputs[:])
            outputs.clear()

    def _drop_cancelled(self, outputs) -> None:
        with self._cond:
            if any(s.cancelled for s in self.waiting):
                for s in self.waiting:
                    if s.cancelled:
                        s.finished = True
                        outputs.append((s, StepOutput([], "abort")))
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
        if any(s.cancelled for s in self.running):
            keep = [i for i, s in enumerate(self.running) if not s.cancelled]
            for s in self.running:
                if s.cancelled:
                    s.finished = True
                    outputs.append((s, StepOutput([], "abort")))
            self.running = [self.running[i] for i in keep]
            self.kv.keep(keep)
        if self.prefilling is not None and self.prefilling.cancelled:
            seq, self.prefilling = self.prefilling, None
            seq.finished, seq.prefill_cache = True, None
            outputs.append((seq, StepOutput([], "abort")))

    def _admit(self, outputs) -> None:
        while True:
            if self.prefilling is None:
                if len(self.running) >= self.max_running:
                    return
                with self._cond:
                    if not self.waiting:
                        return
                    seq = self.waiting.popleft()
                if seq.cancelled:
                    seq.finished = True
                    outputs.append((seq, StepOutput([], "abort")))
                    continue
                self.prefilling = seq
            seq = self.prefilling
            remaining = len(seq.prompt_ids) - seq.prefilled
            # A long prompt joins in chunks while others are generating: their streams pause for one chunk, then
            # get a decode step. Short prompts go in whole (chunking them only costs throughput).
            chunked = bool(self.running) and 0 < self.max_prefill_tokens < remaining
            try:
                logits = self._prefill(seq, self.max_prefill_tokens if chunked else remaining)
                if chunked:
                    return  # the rest of this prompt after the next decode step
                out = self._accept(seq, *self._sample([seq], logits[None])[0])
            except Exception as exc:
                log.exception("prefill failed for request %s", seq.request_id)
                self.prefilling, seq.prefill_cache, seq.finished = None, None, True
                outputs.append((seq, StepOutput([], "error", error=str(exc))))
                continue
            self.prefilling = None
            cache, seq.prefill_cache = seq.prefill_cache, None
            outputs.append((seq, out))
            if not seq.finished:
                self.running.append(seq)
                self.kv.add(cache)
            # Its first token goes out now, not after everyone else admitted with it has been prefilled too.
            self._emit(outputs)

    def _prefill(self, seq: Sequence, take: int) -> torch.Tensor:
        """Feed the next `take` prompt tokens; the logits after the last of them."""
        if seq.prefill_cache is None:
            seq.sampler = Sampler(seq.params, seq.prompt_ids, self.vocab_size, self.device)
            seq.prefill_cache = DynamicCache()
        chunk = seq.prompt_ids[seq.prefilled : seq.prefilled + take]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, cache=seq.prefill_cache, use_cache=True, logits_to_keep=1,
                         **self._adapter_kwargs([seq]))
        seq.prefilled += take
        return out.logits[0, -1].float()

    def _decode_step(self, outputs) -> None:
        cache, mask, positions = self.kv.step_inputs()
        ids = torch.tensor([[s.generated[-1]] for s in self.running], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, **self._adapter_kwargs(self.running))
        tokens = self._sample(self.running, out.logits[:, -1].float())
        keep = []
        for i, (seq, (tok, logprobs)) in enumerate(zip(self.running, tokens)):
            outputs.append((seq, self._accept(seq, tok, logprobs)))
            if not seq.finished:
                keep.append(i)
        if len(keep) != len(self.running):
            self.running = [self.running[i] for i in keep]
            self.kv.keep(keep)

    def _adapter_kwargs(self, seqs: list[Sequence]) -> dict:
        if not getattr(self.model, "peft_config", None):
            return {}
        return {"adapter_names": [s.adapter or "__base__" for s in seqs]}

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[int | Exception, StepLogprobs | None]]:
        """One token per row, or the error that row hit: one bad row must not end the whole batch; with its
        logprobs where the sequence asked for them."""
        raw = self._raw_logprobs(seqs, logits)  # before the forced-prefix mask, logit_bias and penalties
        for i, seq in enumerate(seqs):
            if allowed := seq.allowed_next():
                keep = torch.tensor(allowed, device=logits.device)
                row = torch.full_like(logits[i], float("-inf"))
                row[keep] = logits[i, keep]
                logits[i] = row
        apply_masks(logits, [(i, s.grammar) for i, s in enumerate(seqs) if s.grammar is not None], self.vocab_size)
        broken = torch.isnan(logits[:, : self.vocab_size]).any(dim=-1).tolist()
        tokens: list[int | Exception] = [0] * len(seqs)
        plain = [i for i, s in enumerate(seqs) if s.sampler.is_plain_greedy and not broken[i]]
        if plain:
            best = torch.argmax(logits[plain, : self.vocab_size], dim=-1).tolist()
            for i, tok in zip(plain, best):
                tokens[i] = tok
        for i, seq in enumerate(seqs):
            if broken[i]:
                tokens[i] = NonFiniteLogits(
                    "The model produced NaN scores for the next token (numerical overflow: try DTYPE=float32 "
                    "or bfloat16 instead of float16)."
                )
            elif not seq.sampler.is_plain_greedy:
                try:
                    tokens[i] = seq.sampler.sample(logits[i])
                except Exception as exc:  # noqa: BLE001 - reported to this request only
                    log.warning("sampling failed for request %s: %s", seq.request_id, exc)
                    tokens[i] = exc
        return list(zip(tokens, self._logprobs_of(seqs, raw, tokens)))

    def _raw_logprobs(self, seqs: list[Sequence], logits: torch.Tensor) -> tuple[list[int], torch.Tensor] | None:
        """log_softmax of the model's own scores for the rows that report logprobs (vLLM's default raw mode)."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return None
        return rows, torch.log_softmax(logits[rows, : self.vocab_size], dim=-1)

    def _logprobs_of(self, seqs, raw, tokens) -> list[StepLogprobs | None]:
        out: list[StepLogprobs | None] = [None] * len(seqs)
        if raw is None:
            return out
        rows, lp = raw
        k = max(seqs[i].params.logprobs for i in rows)
        top_values, top_ids = torch.topk(lp, k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for j, i in enumerate(rows):
            if isinstance(tokens[i], Exception):
                continue
            n = seqs[i].params.logprobs
            out[i] = StepLogprobs(float(lp[j, tokens[i]]), list(zip(top_ids[j][:n], top_values[j][:n])))
        return out

    def _accept(self, seq: Sequence, token: int | Exception, logprobs: StepLogprobs | None = None) -> StepOutput:
        """Account for one generated token (or its sampling error); decide whether the sequence is done."""
        if isinstance(token, Exception):
            seq.finished = True
            return StepOutput([], "error", error=str(token))
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if seq.grammar is not None and not seq.grammar.accept(token):  # the mask allowed only what it accepts
            seq.finished = True
            return StepOutput([], "error", error=f"token {token} does not continue the response_format grammar")
        seq.generated.append(token)
        seq.sampler.observe(token)
        finish = None
        if token in seq.stop_token_ids:
            finish = "stop"
        elif len(seq.generated) >= seq.max_tokens:
            finish = "length"
        if finish:
            seq.finished = True
        return StepOutput([token], finish, logprobs=None if logprobs is None else [logprobs])
