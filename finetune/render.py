"""Conversations -> token ids and labels, through the model family the server uses for the same model.

ChatGLM3 rows go through server/families/chatglm3/training.py (THUDM's prompt rules and loss mask, token-exact),
every other model through server/families/chat_template_training.py (its own chat template).

Over-long rule: a row longer than --max-length keeps its first max-length tokens (THUDM's finetune_hf.py cuts
the same way), or is dropped with --overlong drop; a row whose kept part has no trained token left is dropped
either way. Both counts are in the summary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from finetune.data import Conversation, DataError
from server.errors import EngineError

IGNORE_INDEX = -100


@dataclass
class Example:
    ids: list[int]
    labels: list[int]

    @property
    def targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class RenderStats:
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    targets: int = 0
    longest: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def render(conversation: Conversation, family) -> Example:
    try:
        if family.name == "chatglm3":
            from server.families.chatglm3.training import openai_training_example

            ids, labels = openai_training_example(family.tokenizer, conversation.messages, conversation.tools,
                                                  conversation.trained)
        else:
            from server.families.chat_template_training import training_example

            ids, labels = training_example(family, conversation.messages, conversation.tools, conversation.trained)
    except EngineError as exc:
        field = f"field '{exc.param}': " if exc.param else ""
        raise DataError(f"{conversation.where}: {field}{exc.message}") from None
    return Example(ids, labels)


def render_all(conversations: list[Conversation], family, max_length: int, overlong: str = "truncate"):
    """(examples, stats); DataError naming the first row the family cannot render."""
    examples: list[Example] = []
    stats = RenderStats(rows=len(conversations))
    for conversation in conversations:
        example = render(conversation, family)
        stats.longest = max(stats.longest, len(example.ids))
        if len(example.ids) > max_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            example = Example(example.ids[:max_length], example.labels[:max_length])
            if not example.targets:
                stats.dropped += 1
                continue
            stats.truncated += 1
        examples.append(example)
        stats.tokens += len(example.ids)
        stats.targets += example.targets
    stats.examples = len(examples)
    return examples, stats
