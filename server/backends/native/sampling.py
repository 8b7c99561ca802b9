"""Per-sequence sampling: logit_bias, penalties, temperature, top-k/top-p, and a private RNG per request.

Each sequence owns its generator, so a seeded request samples the same tokens whether it runs
alone or in a batch with others.
"""

from __future__ import annotations

import secrets

import torch

from server.types import SamplingParams


class NonFiniteLogits(ValueError):
    """The scores to sample from are NaN or overflowed; no token can be drawn from them."""


class Sampler:
    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device):
        self.params = params
        self.vocab_size = vocab_size
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        uses_counts = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self.counts = torch.zeros(vocab_size, device=device) if uses_counts else None
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor([i for i in prompt_ids if i < vocab_size], dtype=torch.long, device=device)
            self.seen[ids] = True
        self.bias = None  # logit_bias: (ids, values), added before anything else
        if params.logit_bias:
            ids, values = zip(*sorted(params.logit_bias.items()))
            self.bias = (torch.tensor(ids, dtype=torch.long, device=device),
                         torch.tensor(values, dtype=torch.float32, device=device))

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with no penalty: the batch can take one argmax for all such rows."""
        return self.params.greedy and self.counts is None and self.seen is None and self.bias is None

    def observe(self, token_id: int) -> None:
        if self.counts is not None and token_id < self.vocab_size:
            self.counts[token_id] += 1
        if self.seen is not None and token_id < self.vocab_size:
            self.seen[token_id] = True

    def sample(self, logits: torch.Tensor) -> int:
        """logits: [vocab] float32 for this sequence's next token."""
        p = self.params
        logits = logits[: self.vocab_size]
        if self.bias is not None:
            logits = logits.index_add(0, self.bias[0], self.bias[1])
        if self.seen is not None:
            # HF/CTRL semantics: shrink positive logits, push negative ones further down.
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if self.counts is not None:
            # OpenAI semantics: frequency scales with the count, presence is a flat cost once seen.
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        if p.greedy:
            return int(torch.argmax(logits))
        # Shift by the maximum first so a small temperature cannot overflow finite scores into inf - inf = NaN.
        # A finite maximum also means no NaN anywhere (max propagates it), so the softmax below is a distribution.
        top = logits.max()
        if not torch.isfinite(top):
            raise NonFiniteLogits("The next-token scores overflowed after the penalties; lower repetition_penalty "
                                  "or the frequency/presence penalties.")
        logits = (logits - top) / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest set whose mass reaches top_p (always at least the top token).
            drop = cumulative - sorted_probs > p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))
