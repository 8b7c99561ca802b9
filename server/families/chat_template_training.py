"""Fine-tuning examples for chat-template models: the text the server would render, labelled on assistant turns.

The whole conversation is rendered once with the tokenizer's own chat template and tokenized as
`apply_chat_template(tokenize=True)` does (plain `tokenizer(text, add_special_tokens=False)`), so the history
seen by the model in training is the prompt the server builds for it. An assistant turn's characters are what
the template adds between "the history with a generation prompt" and "the history with this answer": the answer
and its end-of-turn token, without whitespace the template writes after that token (the server stops at it, so
the model never produces it). Every token overlapping those characters is a target; the rest are -100.
Templates that render earlier turns differently once later ones exist (some drop old reasoning) cannot be split
this way, and are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.errors import EngineError
from server.families.chat_template import ChatTemplateFamily

IGNORE_INDEX = -100


def training_example(
    family: ChatTemplateFamily,
    messages: Sequence[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    trained: Sequence[bool] | None = None,
) -> tuple[list[int], list[int]]:
    """(input ids, labels) for OpenAI-style messages; `trained[i]`: learn message i (default: every assistant)."""
    if tools and not family.supports_tools:
        raise EngineError("This model's chat template cannot express tools; remove `tools` from the row.",
                          param="tools")
    tokenizer = family.tokenizer
    msgs = [ChatTemplateFamily._message(m) for m in messages]
    trained = [m["role"] == "assistant" for m in msgs] if trained is None else list(trained)

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs[:upto], tools=tools or None, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises for conversations the template forbids (e.g. role order)
            raise EngineError(f"The model's chat template rejected these messages: {exc}", param="messages") from exc

    full = render(len(msgs), False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(msgs):
        if message["role"] != "assistant" or not trained[i]:
            continue
        before, after = render(i, True), render(i + 1, False)
        if not (after.startswith(before) and full.startswith(after)):
            raise EngineError(f"The chat template renders the history differently once message {i} (an assistant "
                              "answer) is added, so its tokens cannot be told apart; put one answer per row.",
                              param=f"messages[{i}]")
        end = len(after.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, stop) in enumerate(encoded["offset_mapping"]):
        if any(start < s_end and stop > s_start for s_start, s_end in spans):
            labels[k] = ids[k]
    return ids, labels
