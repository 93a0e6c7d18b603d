"""Prompt-lookup drafting (worker.engine.speculation.lookup), against a plain search."""

from __future__ import annotations

import random

import pytest

from worker.engine.speculation.lookup import TokenLookup


def searched(tokens: list[int], count: int, min_ngram: int, max_ngram: int) -> list[int]:
    """The draft by brute force: longest suffix n-gram first, its latest earlier occurrence."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if len(tokens) <= n - 1:
            continue
        suffix = tokens[len(tokens) - n :]
        for end in range(len(tokens) - 2, n - 2, -1):
            if tokens[end + 1 - n : end + 1] == suffix:
                return tokens[end + 1 : end + 1 + count]
    return []


def test_the_tokens_after_an_earlier_occurrence_are_proposed():
    lookup = TokenLookup([5, 6, 7, 8, 9, 1, 2, 5, 6])
    assert lookup.draft(3) == [7, 8, 9]
    assert lookup.draft(10) == [7, 8, 9, 1, 2, 5, 6]  # up to the end of what is known


def test_the_longest_ngram_wins_over_a_more_recent_shorter_one():
    # "3 4" occurred at the start (followed by 10); "4" alone occurred later (followed by 20)
    lookup = TokenLookup([3, 4, 10, 4, 20, 3, 4], max_ngram=2)
    assert lookup.draft(1) == [10]
    assert TokenLookup([3, 4, 10, 4, 20, 3, 4], max_ngram=1).draft(1) == [20]


def test_among_equal_ngrams_the_latest_occurrence_wins():
    assert TokenLookup([1, 2, 7, 1, 2, 8, 1, 2], max_ngram=2).draft(1) == [8]


def test_nothing_is_proposed_for_text_that_never_repeats():
    lookup = TokenLookup(range(50))
    assert lookup.draft(4) == []
    assert TokenLookup().draft(4) == []
    assert TokenLookup([1, 1]).draft(0) == []


def test_a_short_ngram_below_the_minimum_proposes_nothing():
    assert TokenLookup([1, 2, 3, 1], min_ngram=2).draft(3) == []
    assert TokenLookup([1, 2, 3, 1], min_ngram=1).draft(3) == [2, 3, 1]


@pytest.mark.parametrize("seed", range(5))
def test_drafts_equal_a_plain_search_as_tokens_arrive(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(6) for _ in range(300)]
    lookup = TokenLookup(tokens[:20], min_ngram=2, max_ngram=4)
    for position in range(20, len(tokens)):
        assert lookup.draft(5) == searched(tokens[:position], 5, 2, 4), position
        lookup.append(tokens[position])


def test_bad_ngram_bounds_are_refused():
    with pytest.raises(ValueError):
        TokenLookup(min_ngram=0)
    with pytest.raises(ValueError):
        TokenLookup(min_ngram=3, max_ngram=2)
