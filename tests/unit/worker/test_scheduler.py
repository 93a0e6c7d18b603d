"""The scheduler's decisions from numbers alone. That BatchRun and BatchWorker apply
them is tested in test_batch_run.py and test_rq_worker.py."""

from __future__ import annotations

import pytest

from worker.scheduler import Load, Scheduler, WaitingRow


def load(running=0, leaving=0, waiting_rows=0, waiting_requests=0, entering=False) -> Load:
    return Load(
        running_rows=running,
        rows_leaving=leaving,
        waiting_rows=waiting_rows,
        waiting_requests=waiting_requests,
        entering_request_waits=entering,
    )


def row(request_id: str, tokens: int = 1, *, width: int | None = None, joins=False, adapter=None):
    return WaitingRow(
        request_id=request_id,
        prompt_tokens=tokens,
        prefill_width=tokens if width is None else width,
        joins_step=joins,
        adapter=adapter,
    )


def waiting(*rows: WaitingRow) -> dict[str, list[WaitingRow]]:
    by_request: dict[str, list[WaitingRow]] = {}
    for waiting_row in rows:
        by_request.setdefault(waiting_row.request_id, []).append(waiting_row)
    return by_request


def plan(scheduler, rows, running=None, *, running_rows=0, leaving=0, adapters_fit=lambda wanted: True):
    chosen = scheduler.plan_prefill(
        rows, running or {}, running_rows=running_rows, rows_leaving=leaving, adapters_fit=adapters_fit
    )
    return [(pick.request_id, pick.joins_step) for pick in chosen]


# -- batching mode and the first jobs of a batch -------------------------------


def test_the_batching_mode_is_checked_and_decides_whether_jobs_join_mid_run():
    assert Scheduler(batching="continuous").admits_mid_run
    assert not Scheduler(batching="micro").admits_mid_run
    with pytest.raises(ValueError, match="batching must be one of"):
        Scheduler(batching="eager")


def test_a_batch_being_collected_takes_jobs_until_its_slots_are_full():
    scheduler = Scheduler(max_rows=4)
    assert not scheduler.is_full(3) and scheduler.is_full(4)
    assert not scheduler.overflows(2, 2) and scheduler.overflows(3, 2)
    assert not Scheduler().is_full(1000) and not Scheduler().overflows(1000, 1000)


# -- admission into a running batch ------------------------------------------


def test_a_job_is_popped_while_a_slot_is_free_that_no_admitted_row_waits_for():
    scheduler = Scheduler(max_rows=4)
    assert scheduler.room_for_another_job(load(running=2, waiting_rows=1, waiting_requests=1))
    assert not scheduler.room_for_another_job(load(running=2, waiting_rows=2, waiting_requests=1))
    assert not scheduler.room_for_another_job(load(running=4))


def test_the_slot_of_a_row_that_surely_ends_in_the_next_step_counts_as_free():
    scheduler = Scheduler(max_rows=2)
    assert not scheduler.room_for_another_job(load(running=2))
    assert scheduler.room_for_another_job(load(running=2, leaving=1))


def test_one_more_job_may_be_popped_to_take_turns_with_an_entering_batch_request():
    scheduler = Scheduler(max_rows=2)
    entering = load(running=1, waiting_rows=4, waiting_requests=1, entering=True)
    assert scheduler.room_for_another_job(entering)
    # not when the slots are all running, nor when another request waits already
    assert not scheduler.room_for_another_job(
        load(running=2, waiting_rows=4, waiting_requests=1, entering=True)
    )
    assert not scheduler.room_for_another_job(
        load(running=1, waiting_rows=5, waiting_requests=2, entering=True)
    )
    assert not scheduler.room_for_another_job(load(running=1, waiting_rows=4, waiting_requests=1))


def test_without_a_bound_there_is_always_room():
    assert Scheduler().room_for_another_job(load(running=100, waiting_rows=100, waiting_requests=5))


# -- which waiting rows are prefilled ------------------------------------------


def test_without_bounds_every_waiting_row_is_prefilled_in_admission_order():
    rows = waiting(row("a"), row("a"), row("b"))
    assert plan(Scheduler(), rows) == [("a", False), ("b", False), ("a", False)]


def test_the_request_with_fewest_rows_running_goes_first_ties_in_admission_order():
    rows = waiting(row("big"), row("big"), row("big"), row("single"))
    # big already has a row running: single goes first, then they take turns
    assert plan(Scheduler(max_rows=4), rows, {"big": 1}, running_rows=1) == [
        ("single", False),
        ("big", False),
        ("big", False),
    ]


def test_rows_prefilled_before_the_step_take_free_slots_only():
    rows = waiting(row("a"), row("b"), row("c"))
    assert plan(Scheduler(max_rows=3), rows, running_rows=1, leaving=1) == [("a", False), ("b", False)]
    assert plan(Scheduler(max_rows=3), rows, running_rows=3, leaving=3) == []


def test_rows_joining_the_step_also_take_the_slots_of_rows_ending_in_it():
    rows = waiting(row("a", joins=True), row("b", joins=True), row("c", joins=True))
    assert plan(Scheduler(max_rows=2), rows, running_rows=2, leaving=1) == [("a", True)]
    assert plan(Scheduler(max_rows=3), rows, running_rows=2, leaving=1) == [("a", True), ("b", True)]


def test_a_row_that_cannot_join_waits_while_joining_rows_take_ending_slots():
    rows = waiting(row("c", adapter="x"), row("b", joins=True), row("d", joins=True))
    assert plan(Scheduler(max_rows=2), rows, running_rows=1, leaving=1) == [("c", False), ("b", True)]


@pytest.mark.parametrize(
    ("joins", "expected"),
    [
        (True, [("long", True), ("short", True)]),  # their own lengths: 4 + 2 fits 6
        (False, [("long", False)]),  # one shared prefill pads both to 4: 8 does not fit
    ],
)
def test_the_budget_counts_padding_only_where_prompts_share_a_prefill(joins, expected):
    rows = waiting(row("long", 4, joins=joins), row("short", 2, joins=joins))
    assert plan(Scheduler(max_rows=4, max_prefill_tokens=6), rows, running_rows=1) == expected


def test_a_wider_prompt_widens_every_row_of_a_shared_prefill():
    rows = waiting(row("a", 1, width=2), row("b", 1, width=5))
    assert plan(Scheduler(max_prefill_tokens=9), rows) == [("a", False)]  # 2 x 5, not 2 + 5
    assert plan(Scheduler(max_prefill_tokens=10), rows) == [("a", False), ("b", False)]


def test_a_prompt_longer_than_the_budget_runs_alone_in_its_step():
    rows = waiting(row("long", 50), row("short", 1))
    assert plan(Scheduler(max_prefill_tokens=8), rows) == [("long", False)]
    assert plan(Scheduler(max_prefill_tokens=8), waiting(row("short", 1), row("long", 50))) == [
        ("short", False)
    ]


def test_a_row_whose_adapter_finds_no_slot_is_passed_over_and_base_rows_still_go():
    rows = waiting(row("beta", adapter="beta"), row("plain"))
    assert plan(Scheduler(max_rows=8), rows, adapters_fit=lambda wanted: wanted <= {"alpha"}) == [
        ("plain", False)
    ]


def test_the_oldest_waiting_request_is_not_overtaken_by_other_adapters():
    rows = waiting(row("b", adapter="beta"), row("a2", adapter="alpha"), row("plain"))
    # alpha holds the only slot: beta (the oldest) waits for it, so a2 waits behind it
    assert plan(Scheduler(max_rows=8), rows, adapters_fit=lambda wanted: wanted <= {"alpha"}) == [
        ("plain", False)
    ]


def test_rows_of_one_step_share_the_adapter_slots():
    rows = waiting(row("a", adapter="alpha"), row("b", adapter="beta"))
    assert plan(Scheduler(max_rows=8), rows, adapters_fit=lambda wanted: len(wanted) <= 1) == [("a", False)]


def test_planning_changes_neither_the_waiting_rows_nor_the_running_counts():
    rows = waiting(row("a"), row("a"), row("b"))
    running = {"a": 1}
    plan(Scheduler(), rows, running)
    assert [len(queue) for queue in rows.values()] == [2, 1] and running == {"a": 1}
