"""Prompt lookup (engine/speculation.py): which tokens become drafts, and who gets them."""

from __future__ import annotations

import pytest

from lmserve.engine.speculation import LOOKBACK, drafts_for, propose
from lmserve.request import SamplingParams


def test_the_tokens_after_the_latest_earlier_occurrence_of_the_tail_are_the_draft():
    ids = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose(ids, 3) == [7, 8, 5]  # the latest earlier "1 2 3" is followed by 7 8 5
    assert propose(ids, 1) == [7]
    assert propose(ids, 0) == []


def test_the_longest_recurring_tail_wins_and_a_single_token_is_not_enough():
    # "4 2 3" recurs (followed by 6); "2 3" alone recurs later (followed by 5): the longer match wins
    ids = [4, 2, 3, 6, 6, 2, 3, 5, 0, 4, 2, 3]
    assert propose(ids, 2) == [6, 6]
    assert propose([5, 1, 8, 1], 2) == []  # only "1" recurs
    assert propose([7, 7], 3) == []
    assert propose([], 3) == []


def test_a_draft_near_the_end_is_shorter_and_the_lookup_stays_in_its_window():
    assert propose([1, 2, 1, 2], 4) == [1, 2]
    far = [1, 2, 3] + [0] * LOOKBACK + [1, 2]
    assert propose(far, 2) == []  # its only earlier "1 2" is past the lookback


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(temperature=0), True),
    (SamplingParams(temperature=0, stop=("x",), max_tokens=5, seed=3), True),
    (SamplingParams(temperature=0.7), False),
    (SamplingParams(temperature=0, logprobs=0), False),
    (SamplingParams(temperature=0, logit_bias=((1, 2.0),)), False),
    (SamplingParams(temperature=0, repetition_penalty=1.1), False),
    (SamplingParams(temperature=0, presence_penalty=0.5), False),
    (SamplingParams(temperature=0, min_tokens=2), False),
])
def test_only_plain_greedy_sequences_take_drafts(params, expected):
    assert drafts_for(params) is expected
