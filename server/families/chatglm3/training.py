"""ChatGLM3 fine-tuning examples: the tokens the server would build for the conversation, labelled like THUDM.

The rows go through the serving path itself: `from_openai` (tools into the system turn, tool calls as assistant
turns with the tool name as metadata, tool results as observation turns) and `message_ids`, the per-message
encoding of `build_messages`. So every prompt prefix of a training row is token for token the prompt the server
sends the model for that history.

Labels follow THUDM's finetune_demo (`format_conversation` in preprocess_utils.py; `process_batch` in
finetune_hf.py has the same shift): a mask marks each token "whose *prediction* takes loss", true for every token
of a trained assistant turn, and the labels are that mask shifted right by one. So the `<|assistant|>` role token
itself is not a target (the user side put it there; the server puts it at the end of every prompt), but
everything the model says after it is: the metadata line (`" \\n"` for a plain answer, the tool name for a call),
the content, and the token that ends the turn (the next role token, e.g. `<|user|>` or `<|observation|>`, or
the final eos), which is what makes the model stop. `[gMASK]`, `sop`, system, user and observation turns are
never targets. The final eos is appended as THUDM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.families.chatglm3.prompt import from_openai, message_ids
from server.families.chatglm3.tokenizer import ChatGLM3Tokenizer

IGNORE_INDEX = -100  # what transformers' cross-entropy skips


def training_example(
    tokenizer: ChatGLM3Tokenizer, messages: Sequence[dict[str, Any]], trained: Sequence[bool]
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of official-format messages; `trained[i]`: message i's tokens predict a target."""
    ids = tokenizer.prefix_tokens()
    predicts = [False] * len(ids)
    for item, train in zip(messages, trained, strict=True):
        piece = message_ids(tokenizer, item)
        ids += piece
        predicts += [bool(train) and item["role"] == "assistant"] * len(piece)
    ids.append(tokenizer.eos_token_id)
    predicts.append(False)
    labels = [IGNORE_INDEX] + [t if p else IGNORE_INDEX for t, p in zip(ids[1:], predicts[:-1])]
    return ids, labels


def openai_training_example(
    tokenizer: ChatGLM3Tokenizer,
    messages: Sequence[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    trained: Sequence[bool] | None = None,
) -> tuple[list[int], list[int]]:
    """An OpenAI conversation (messages, tools) as the server renders it; `trained[i]` for each *input* message
    (default: every assistant message). EngineError for what ChatGLM3 cannot express, as when serving."""
    trained = [m.get("role") == "assistant" for m in messages] if trained is None else list(trained)
    turns = from_openai(messages, tools).messages
    # One input message can become several turns (an assistant message with two tool calls becomes two assistant
    # turns; tools add a system turn): count the turns of each growing prefix to know where each one came from.
    flags: list[bool] = []
    for i in range(len(messages)):
        n = len(from_openai(messages[: i + 1], tools).messages) if i + 1 < len(messages) else len(turns)
        flags += [trained[i]] * (n - len(flags))
    return training_example(tokenizer, turns, flags)
