"""The `--speculative` policy (worker.engine.speculation.drafting): who drafts, how much."""

from __future__ import annotations

import pytest

from shared import defaults
from worker.engine.speculation.drafting import Drafting

LOOP = [5, 6, 7, 8] * 4  # every suffix occurred before: lookups always find a draft


def test_off_never_drafts_and_keeps_no_row_state():
    drafting = Drafting("off")
    assert drafting.row(LOOP) is None
    assert drafting.drafts([None, None], [10, 10]) == [[], []]


def test_ngram_drafts_what_followed_within_the_room_left():
    drafting = Drafting("ngram", draft_tokens=3)
    state = drafting.row(LOOP)
    assert drafting.drafts([state], [10]) == [[5, 6, 7]]
    assert drafting.drafts([state], [2]) == [[5, 6]]  # max_new_tokens left
    assert drafting.drafts([state], [0]) == [[]]


def test_auto_shortens_drafts_as_rows_grow():
    drafting = Drafting("auto", draft_tokens=4)
    budget = defaults.SPECULATION_AUTO_MAX_FED_TOKENS
    for rows in (1, 2, 3, 4, 8, budget):
        states = [drafting.row(LOOP) for _ in range(rows)]
        drafts = drafting.drafts(states, [100] * rows)
        assert all(len(d) == min(4, budget // rows - 1) for d in drafts), rows
        assert rows * (1 + max(len(d) for d in drafts)) <= max(budget, rows)


def test_auto_rests_a_row_whose_drafts_fail_then_tries_again():
    drafting = Drafting("auto", draft_tokens=4)
    state = drafting.row(LOOP)
    for _ in range(3):
        state.fed = drafting.drafts([state], [100])[0]
        assert state.fed
        drafting.checked(state, 0)
        if state.resting:
            break
    assert state.resting == defaults.SPECULATION_AUTO_REST_STEPS
    for _ in range(defaults.SPECULATION_AUTO_REST_STEPS):
        assert drafting.drafts([state], [100]) == [[]]
    assert drafting.drafts([state], [100]) != [[]]
    assert drafting.counters.drafted > 0 and drafting.counters.kept == 0


def test_ngram_never_rests():
    drafting = Drafting("ngram", draft_tokens=4)
    state = drafting.row(LOOP)
    for _ in range(5):
        state.fed = drafting.drafts([state], [100])[0]
        drafting.checked(state, 0)
    assert state.resting == 0 and drafting.drafts([state], [100])[0]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Drafting("sometimes")
    with pytest.raises(ValueError):
        Drafting("auto", draft_tokens=0)
    with pytest.raises(ValueError):
        Drafting("auto", draft_tokens=defaults.MAX_DRAFT_TOKENS + 1)
