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
        state.fed = state.look_up(drafting.draft_tokens)
        drafting.checked(state, kept_of_each)


def test_auto_drafts_long_for_a_row_whose_drafts_are_kept():
    drafting = Drafting("auto", draft_tokens=6)
    state = drafting.row([*range(20), 0, 1])  # "0 1" was followed by 2, 3, 4...
    checked_many(drafting, state, kept_of_each=6)
    assert state.evidence["ngram"].keep_rate > 0.9
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


class CountingModel:
    """A stand-in draft model: drafts 1, 2, 3... and counts the tokens it drafted."""

    def __init__(self, cost: float):
        self.cost, self.drafted = cost, 0

    def propose(self, cursor, tokens, count):
        self.drafted += count
        return list(range(1, count + 1))


FRESH = list(range(100, 140))  # nothing repeats: lookups find nothing


def test_draft_mode_drafts_with_the_model_for_every_row_but_rows_with_images():
    model = CountingModel(cost=0.5)
    drafting = Drafting("draft", draft_tokens=4, model=model)
    text, image = drafting.row(LOOP), drafting.row(FRESH, images=True)
    assert drafting.drafts([text, image], [10, 10]) == [[1, 2, 3, 4], []]
    assert drafting.drafts([text], [2]) == [[1, 2]]
    assert text.fed_by == "model" and model.drafted == 6


def test_auto_drafts_with_a_cheap_model_where_lookups_find_nothing():
    model = CountingModel(cost=0.02)
    drafting = Drafting("auto", draft_tokens=6, model=model)
    looped, fresh = drafting.row(LOOP), drafting.row(FRESH)
    drafts = drafting.drafts([looped, fresh], [100, 100])
    assert drafts[0][:1] == [5] and looped.fed_by == "ngram"  # the lookup's draft
    assert drafts[1] and drafts[1] == list(range(1, len(drafts[1]) + 1)) and fresh.fed_by == "model"
    for _ in range(10):  # the model's drafts are always kept: it drafts long
        fresh.fed = drafting.drafts([fresh], [100])[0]
        drafting.checked(fresh, len(fresh.fed))
    assert drafting.drafts([fresh], [100]) == [[1, 2, 3, 4, 5, 6]]
    assert drafting.counters["model"].kept == drafting.counters["model"].drafted > 0


def test_auto_stops_asking_a_model_whose_drafts_fail():
    model = CountingModel(cost=0.02)
    drafting = Drafting("auto", draft_tokens=6, model=model)
    fresh = drafting.row(FRESH)
    for _ in range(10):
        fresh.fed = drafting.drafts([fresh], [100])[0]
        drafting.checked(fresh, 0)
    assert drafting.drafts([fresh], [100]) == [[]]


def test_auto_never_asks_a_model_as_costly_as_a_step_nor_for_rows_with_images():
    costly = Drafting("auto", draft_tokens=6, model=CountingModel(cost=1.0))
    sure = costly.row(FRESH)
    sure.evidence["model"].kept_recently = 1000.0  # even drafts always kept would not pay
    assert costly.drafts([sure], [100]) == [[]] and costly.model.drafted == 0
    cheap = Drafting("auto", draft_tokens=6, model=CountingModel(cost=0.01))
    assert cheap.drafts([cheap.row(FRESH, images=True)], [100]) == [[]] and cheap.model.drafted == 0
