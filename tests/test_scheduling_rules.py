"""Pure rules of the scheduler and the drafter, without a model."""

from __future__ import annotations

import pytest

from appliance.scheduler import common_prefix, prefill_chunk, reusable_prefix
from appliance.speculative import NgramIndex


@pytest.mark.parametrize(
    ("remaining", "budget", "exact", "expected"),
    [
        (100, 512, 2, 100),  # the whole rest fits
        (100, 40, 2, 40),
        (100, 99, 2, 98),  # never leave a rest shorter than an exact chunk
        (3, 2, 2, 0),  # 2 now would leave 1: wait for a bigger budget
        (1, 1, 2, 1),  # a one-token prompt is one chunk
        (50, 0, 2, 0),
        (300, 128, 64, 128),
        (150, 128, 64, 86),  # 128 would leave 22
        (100, 64, 64, 0),  # 64 would leave 36, and 36 is too short a chunk: wait
        (40, 128, 64, 40),  # a prompt shorter than a chunk goes whole
        (40, 30, 64, 0),
    ],
)
def test_prefill_chunk_keeps_chunks_exact(remaining: int, budget: int, exact: int, expected: int) -> None:
    assert prefill_chunk(remaining, budget, exact) == expected


@pytest.mark.parametrize(
    ("cached", "prompt", "expected"),
    [
        (200, 300, 200),  # long after long: the shared prefix...
        (300, 200, 200 - 64),  # ...up to all but the last exact chunk
        (100, 100, 100 - 64),
        (30, 30, 29),  # short after short: all but the last token
        (30, 40, 30),
        (40, 30, 29),
        (30, 100, 0),  # short-path rows cannot stand in for long-path ones
        (100, 30, 0),  # nor the other way round
        (0, 30, 0),
        (64, 64, 0),
    ],
)
def test_reusable_prefix_keeps_each_row_on_its_kernel_path(cached: int, prompt: int, expected: int) -> None:
    tokens = list(range(1000))
    assert reusable_prefix(tokens[:cached], tokens[:prompt], exact=64) == expected


def test_reusable_prefix_stops_at_the_first_difference() -> None:
    assert reusable_prefix([1, 2, 3, 4, 5], [1, 2, 9, 4], exact=64) == 2
    assert reusable_prefix(list(range(100)), [*range(70), 0, *range(71, 200)], exact=64) == 70


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_ngram_draft_continues_the_latest_earlier_occurrence() -> None:
    index = NgramIndex([5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 0, 1, 2])
    index.append(3)  # suffix 1 2 3 occurred twice before: the latest continues with 7 8
    assert index.draft(2) == [7, 8]
    assert index.draft(0) == []


def test_ngram_draft_falls_back_to_shorter_ngram_and_may_find_nothing() -> None:
    index = NgramIndex([4, 6, 1, 2, 3], ngram_sizes=(3, 2))
    assert index.draft(4) == []  # "2 3" and "1 2 3" never occurred before
    index.append(4)
    index.append(6)  # "4 6" occurred at the start, followed by 1 2 3 4
    assert index.draft(3) == [1, 2, 3]
