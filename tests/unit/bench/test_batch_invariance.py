"""The batch-invariance bench's pure helpers (no model loaded)."""

from bench.batch_invariance import changed_at, compare_answers, first_divergence, join_steps, ratio


def test_first_divergence_is_the_first_differing_token_or_none():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([5], [6]) == 0
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one answer ended sooner
    assert first_divergence([], []) is None


def test_compare_answers_counts_rows_and_keeps_each_rows_divergence():
    result = compare_answers([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 0, 6], [0, 8]])
    assert result == {
        "rows_differing": 2,
        "rows": 3,
        "first_divergence": [None, 1, 0],
        "earliest_divergence": 0,
    }
    assert compare_answers([[1]], [[1]])["earliest_divergence"] is None


def test_join_steps_and_changed_at_and_ratio():
    assert join_steps(4, 3) == [0, 3, 6, 9]
    assert changed_at({8: False, 2: True, 4: False}) == [4, 8]
    assert changed_at({1: True}) == []
    assert ratio([2.0, 4.0, 3.0], [1.0, 1.0, 2.0]) == 3.0
