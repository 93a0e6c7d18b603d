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


def checked_many(drafting: Drafting, state, kept_of_each: int, times: int = 10) -> None:
    for _ in range(times):
        state.fed = state.draft(drafting.draft_tokens)
        drafting.checked(state, kept_of_each)


def test_auto_drafts_long_for_a_row_whose_drafts_are_kept():
    drafting = Drafting("auto", draft_tokens=6)
    state = drafting.row([*range(20), 0, 1])  # "0 1" was followed by 2, 3, 4...
    checked_many(drafting, state, kept_of_each=6)
    assert state.keep_rate > 0.9
    assert drafting.drafts([state], [100]) == [[2, 3, 4, 5, 6, 7]]


def test_auto_stops_drafting_for_a_row_whose_drafts_fail_and_tries_again_later():
    drafting = Drafting("auto", draft_tokens=6)
    state = drafting.row(LOOP)
    assert drafting.drafts([state], [100])[0]  # no evidence yet: worth a try
    checked_many(drafting, state, kept_of_each=0)
    steps = 0
    while drafting.drafts([state], [100]) == [[]]:  # each step without a draft forgets a little
        steps += 1
        assert steps < 100
    assert steps >= 1  # it rested before trying again


def test_auto_weighs_the_cost_of_feeding_every_row():
    drafting = Drafting("auto", draft_tokens=6)
    good = drafting.row(LOOP)
    checked_many(drafting, good, kept_of_each=3)  # about 3 of 6 kept: half the time a run of 3
    alone = drafting.drafts([good], [100])[0]
    crowd = [drafting.row(range(100 + i * 50, 150 + i * 50)) for i in range(7)]  # nothing to draft
    busy = drafting.drafts([good, *crowd], [100] * 8)
    assert len(alone) >= 2 and len(busy[0]) < len(alone)
    assert all(draft == [] for draft in busy[1:])


def test_auto_never_looks_up_drafts_for_a_batch_too_big_to_gain():
    drafting = Drafting("auto", draft_tokens=6)
    rows = [drafting.row(LOOP) for _ in range(16)]
    assert drafting.drafts(rows, [100] * 16) == [[]] * 16
    assert all(state._lookup is None for state in rows)  # no index built: it costs memory
    assert drafting.drafts(rows[:1], [100])[0] and rows[0]._lookup is not None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Drafting("sometimes")
    with pytest.raises(ValueError):
        Drafting("auto", draft_tokens=0)
    with pytest.raises(ValueError):
        Drafting("auto", draft_tokens=defaults.MAX_DRAFT_TOKENS + 1)
