"""Forced answer prefixes over an HTTP engine: walk the prefix trie, asking it only where the prefixes branch.

The rule is the native scheduler's (Sequence.allowed_next): the answer must start with one of the prefixes; the
constraint ends once one prefix is complete. Where a single next token is possible it is appended without a
model call (the answer is fixed there whatever the model says); at a branch the engine samples one token among
the children only (vLLM: `allowed_token_ids`; llama.cpp: a logit bias), so the model still picks (a ChatGLM3
`tool_choice: "required"` picks its tool). Measured cost (tests/test_vllm_backend.py): one extra short request
per branch, whose prompt prefill mostly hits the engine's prefix cache.

The forced tokens are appended to the prompt of the next engine request, so presence/frequency penalties count
them as prompt, not output, tokens (repetition_penalty treats both alike); greedy output is unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence


def allowed_next(prefixes: Sequence[Sequence[int]], done: Sequence[int]) -> list[int]:
    """The tokens that keep `done` on one of `prefixes`; [] once one is complete (or none given)."""
    if not prefixes:
        return []
    n, done = len(done), list(done)
    if any(list(p) == done for p in prefixes):
        return []
    return sorted({p[n] for p in prefixes if len(p) > n and list(p[:n]) == done})
