"""bench/gguf_types.py's pure parts: agreement of answers, /proc parsing, the process tree walk, the hold-out set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` is not an installed package

from bench.gguf_types import HOLDOUT, agreement, descendants, leading_agreement, status_kib  # noqa: E402
from server.families.chatglm3.tokenizer import ChatGLM3Tokenizer  # noqa: E402
from tests.support import CHATGLM3_FIXTURES  # noqa: E402


def test_leading_agreement_counts_up_to_the_first_difference_over_the_longer_answer():
    assert leading_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert leading_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5  # what follows a difference does not count
    assert leading_agreement([1, 2], [1, 2, 3, 4]) == 0.5  # a longer (or shorter) answer is a disagreement
    assert leading_agreement([5], [1, 2]) == 0.0
    assert leading_agreement([], []) == 1.0


def test_agreement_through_the_chatglm3_tokenizer():
    encode = ChatGLM3Tokenizer(CHATGLM3_FIXTURES / "tokenizer.model").sp_encode
    ref = ["你好，世界", "The quick brown fox", ""]
    same = agreement(ref, list(ref), encode)
    assert same["exact_match"] == 1.0 and same["leading_tokens"] == 1.0
    other = agreement(ref, ["你好，世界", "The quick red fox", "x"], encode)
    assert other["exact_match"] == pytest.approx(1 / 3)
    # "▁The ▁quick" agree, then brown/red part: 2 of 4 tokens on the second answer, none on the third
    assert other["per_prompt"] == [1.0, 0.5, 0.0]
    assert other["leading_tokens"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        agreement(ref, ref[:2], encode)


def test_status_kib_reads_our_own_process():
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    assert status_kib(status, "VmRSS") > 1000
    assert status_kib("Name:\tx\nVmHWM:\t  2048 kB\n", "VmHWM") == 2048
    with pytest.raises(ValueError):
        status_kib("Name:\tx\n", "VmRSS")


def test_descendants_walks_the_whole_tree_below_a_pid():
    parents = {10: 1, 11: 10, 12: 11, 13: 10, 20: 1, 21: 20}
    assert descendants(parents, 10) == [11, 13, 12]
    assert descendants(parents, 12) == []


def test_holdout_is_twenty_distinct_chats_that_end_on_a_user_turn():
    assert len(HOLDOUT) == 20
    assert len({repr(chat) for chat in HOLDOUT}) == 20
    assert all(chat[-1]["role"] == "user" for chat in HOLDOUT)
    text = " ".join(m["content"] for chat in HOLDOUT for m in chat)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and "the" in text  # Chinese and English
