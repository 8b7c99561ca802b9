"""A backend's per-token logprobs (ids and floats) -> the entries users see, lined up with the returned text.

Each entry carries its token's own text and UTF-8 bytes (from the family: a character spread over byte-fallback
tokens has its bytes split between them, so `bytes` joins to the text while `token` shows a lone piece's bytes as
\\x escapes, as OpenAI does). Entries go out with the text their token starts in, and a stop string that cuts the
text cuts them too: the tokens that begin inside or after the stop string are not reported, as they are not in the
answer. The stop *token* that ended an answer is reported (it is counted in completion_tokens), with its own text.
"""

from __future__ import annotations

import math
from functools import lru_cache

from server.backends.base import StepLogprobs
from server.types import TextDelta, TokenLogprob

FLOOR = -9999.0  # what OpenAI-shaped APIs (and vLLM) send for -inf / NaN, which JSON cannot carry


def _finite(x: float) -> float:
    return FLOOR if math.isnan(x) else max(float(x), FLOOR)


class TokenTexts:
    """token id -> (text, bytes) for logprob entries, cached: the top lists repeat the same ids over and over."""

    def __init__(self, family):
        self._piece = lru_cache(maxsize=65536)(self._uncached)
        self._family = family

    def _uncached(self, token_id: int) -> tuple[str, list[int]]:
        raw = self._family.token_bytes(token_id)
        return raw.decode("utf-8", errors="backslashreplace"), list(raw)

    def entry(self, token_id: int, step: StepLogprobs) -> TokenLogprob:
        text, raw = self._piece(token_id)
        top = [(*self._piece(i), _finite(lp)) for i, lp in step.top]
        return TokenLogprob(text, raw, _finite(step.logprob), top)


class LogprobTracker:
    """Holds each entry until the text its token starts in has passed the stop-string matcher.

    Offsets count characters of the detokenized answer (before stop strings): a token starts where the text stood
    when it was pushed, so the bytes of one character spread over several tokens all start where that character does.
    """

    def __init__(self, texts: TokenTexts):
        self._texts = texts
        self._pending: list[tuple[int, TokenLogprob]] = []
        self._ready: list[TokenLogprob] = []

    def add(self, token_id: int, step: StepLogprobs | None, start: int) -> None:
        if step is not None:
            entry = self._texts.entry(token_id, step)
            entry.offset = start
            self._pending.append((start, entry))

    def released(self, upto: int) -> None:
        """The text before offset `upto` is out: the tokens that start in it are in the answer."""
        keep = [(s, e) for s, e in self._pending if s >= upto]
        self._ready += [e for s, e in self._pending if s < upto]
        self._pending = keep

    def finish(self, cut: int | None) -> None:
        """The answer ended; `cut`: a stop string ended the text at that offset (None: nothing was cut)."""
        if cut is None:
            self._ready += [e for _, e in self._pending]
            self._pending = []
        else:
            self.released(cut)
            self._pending = []

    def attach(self, events: list) -> list:
        """The ready entries ride on the first text delta of `events` (or wait for a later one)."""
        if not self._ready:
            return events
        for i, event in enumerate(events):
            if isinstance(event, TextDelta):
                events[i] = TextDelta(event.text, (event.logprobs or []) + self._ready)
                self._ready = []
                break
        return events

    def rest(self) -> list:
        """What no text delta took: one empty delta with them (before the answer's Finished)."""
        ready, self._ready = self._ready, []
        return [TextDelta("", ready)] if ready else []
