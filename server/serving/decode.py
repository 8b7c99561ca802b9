"""Token ids -> user-visible text, one token at a time: UTF-8 safe deltas and stop strings.

Both run on the engine thread so a matched stop string ends the sequence at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing id list into text deltas that never split a character.

    Decoding a small window (a few tokens of context before the new ones) instead of the whole
    sequence keeps each step O(1); the context makes leading-space rules of sentencepiece-style
    tokenizers come out as they do in a full decode. A delta ending in U+FFFD is an incomplete
    byte sequence (Chinese or emoji split over byte-fallback tokens) and is held back.
    """

    CONTEXT = 5

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this are already emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta()

    def _delta(self) -> str:
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT):
            return ""
        if not full_text.startswith(prefix_text):
            # The context decoded differently once more tokens arrived (rare): emit only what is new.
            common = 0
            while common < min(len(prefix_text), len(full_text)) and prefix_text[common] == full_text[common]:
                common += 1
            prefix_text = prefix_text[:common]
        self._read = len(self.ids)
        self._prefix = max(0, self._read - self.CONTEXT)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back at the end, exactly as a full decode renders it.

        A generation cut by max_tokens inside a multi-byte character therefore ends in U+FFFD, as the
        non-streamed text does: the joined stream always equals the full decode.
        """
        if self._read == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        self._read = len(self.ids)
        return full_text[len(prefix_text) :] if full_text.startswith(prefix_text) else ""


class StopStrings:
    """Removes stop strings from a text stream, also when one spans several deltas.

    Text that could be the start of a stop string is held back until it is clear either way,
    so the stop text never reaches the client.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string matched)."""
        if not self.stops:
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        keep = 0
        for k in range(min(self._hold, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self._pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
