from __future__ import annotations

import time

import fakeredis
import pytest

from shared import events, keys
from shared.payload import GenerateRequest, GenerationJob
from tests.support.fake_engine import FakeEngine
from worker.batch_run import BatchRun
from worker.engine.adapters import AdaptersBusy
from worker.engine.engine import PromptError
from worker.publisher import EventPublisher


def make_job(request_id: str, **payload) -> GenerationJob:
    return GenerationJob(
        request_id=request_id, request=GenerateRequest(**payload), seed=7, enqueued_at=time.time()
    )


@pytest.fixture
def connection():
    return fakeredis.FakeRedis()


def collect(connection, *request_ids):
    pubsub = connection.pubsub()
    pubsub.subscribe(*[keys.events_channel(request_id) for request_id in request_ids])
    pubsub.get_message(timeout=0.1)
    for _ in request_ids[1:]:
        pubsub.get_message(timeout=0.1)
    return pubsub


def drain(pubsub):
    received = []
    while (message := pubsub.get_message(timeout=0.05)) is not None:
        if message["type"] == "message":
            received.append(
                (keys.request_id_from_channel(message["channel"].decode()), events.decode(message["data"]))
            )
    return received


def test_rows_of_different_requests_run_in_one_batch(connection):
    engine = FakeEngine()
    jobs = [
        make_job("a", text="one two", max_new_tokens=2),
        make_job("b", text=["x", "y z"], max_new_tokens=3),
    ]
    outcomes = BatchRun(engine, EventPublisher(connection), jobs).run()
    assert len(engine.added) == 1 and len(engine.added[0]) == 3
    assert outcomes["a"].result()["text"] == ["w1 w2 "]
    assert outcomes["b"].result()["text"] == ["w1 w2 w3 ", "w1 w2 w3 "]
    assert outcomes["b"].finish_reasons == ["length", "length"]


def test_rows_yielding_several_tokens_a_step_stream_them_in_order_and_count_as_one_row(connection):
    from worker.stats import StatsRecorder

    engine, stats = FakeEngine(tokens_per_step=3), StatsRecorder()
    jobs = [make_job("a", text=["one", "two"], max_new_tokens=7)]
    outcomes = BatchRun(engine, EventPublisher(connection), jobs, stats=stats).run()
    assert outcomes["a"].result()["text"] == ["w1 w2 w3 w4 w5 w6 w7 "] * 2
    snapshot = stats.snapshot()
    assert snapshot.decode_steps == 3 and snapshot.tokens_generated == 14
    assert snapshot.rows_sum == 6  # 2 rows in each of 3 steps


def test_each_row_gets_its_own_params_and_seed(connection):
    engine = FakeEngine()
    job = make_job(
        "a",
        text=["p", "q"],
        max_new_tokens=2,
        sampling_topk=5,
        sampling_temperature=0.5,
        repetition_penalty=1.3,
    )
    BatchRun(engine, EventPublisher(connection), [job]).run()
    first, second = engine.added[0]
    assert first.params.top_k == 5 and first.params.temperature == 0.5
    assert first.params.repetition_penalty == 1.3
    assert (first.params.seed, second.params.seed) == (7, 8)
    assert first.key == ("a", 0) and second.key == ("a", 1)


def test_events_are_published_with_per_row_sequence_numbers(connection):
    pubsub = collect(connection, "a")
    BatchRun(
        FakeEngine(), EventPublisher(connection), [make_job("a", text=["p", "q"], max_new_tokens=2)]
    ).run()
    received = [event for _, event in drain(pubsub)]
    tokens = [(event.row, event.seq, event.text) for event in received if event.type == "token"]
    assert sorted(tokens) == [(0, 0, "w1 "), (0, 1, "w2 "), (1, 0, "w1 "), (1, 1, "w2 ")]
    done = [event for event in received if event.type == "done"]
    assert {event.row for event in done} == {0, 1}
    assert all(event.usage.completion_tokens == 2 for event in done)


def test_prompt_too_long_for_the_context_fails_only_that_request(connection):
    pubsub = collect(connection, "long", "ok")
    engine = FakeEngine(context_length=10)
    jobs = [make_job("long", text="a b c", max_new_tokens=8), make_job("ok", text="a", max_new_tokens=2)]
    outcomes = BatchRun(engine, EventPublisher(connection), jobs).run()
    assert outcomes["long"].error.status == 422
    assert "context" in outcomes["long"].error.error
    assert outcomes["ok"].result()["text"] == ["w1 w2 "]
    errors = [event for request_id, event in drain(pubsub) if event.type == "error"]
    assert len(errors) == 1


def test_cancelled_request_leaves_the_batch_and_others_continue(connection):
    engine = FakeEngine()
    jobs = [make_job("gone", text="a", max_new_tokens=50), make_job("stays", text="b", max_new_tokens=5)]
    run = BatchRun(
        engine, EventPublisher(connection), jobs, on_step=lambda: connection.set(keys.cancel_key("gone"), 1)
    )
    outcomes = run.run()
    assert outcomes["gone"].finish_reasons == ["cancelled"]
    assert len(outcomes["gone"].texts[0]) == 2  # the cancel set after step 1 is seen at step 2
    assert outcomes["stays"].finish_reasons == ["length"]
    assert engine.steps == 5


def test_a_steps_events_are_published_before_the_model_runs_on_its_tokens(connection):
    engine = FakeEngine()
    pubsub = collect(connection, "a")
    published_by_forward = []
    engine.on_forward = lambda: published_by_forward.append([event.type for _, event in drain(pubsub)])
    outcomes = BatchRun(engine, EventPublisher(connection), [make_job("a", text="x", max_new_tokens=3)]).run()
    assert published_by_forward == [["token"], ["token"], ["token", "done"]]
    assert outcomes["a"].result()["text"] == ["w1 w2 w3 "]


def test_engine_failure_fails_every_unfinished_request(connection):
    pubsub = collect(connection, "a")
    outcomes = BatchRun(
        FakeEngine(fail_at_step=2), EventPublisher(connection), [make_job("a", text="x", max_new_tokens=5)]
    ).run()
    assert outcomes["a"].error.error_type == "generation_error"
    assert [event.type for _, event in drain(pubsub)][-1] == "error"


def test_request_cancelled_while_queued_never_reaches_the_engine(connection):
    engine = FakeEngine()
    connection.set(keys.cancel_key("gone"), 1)
    jobs = [make_job("gone", text="a", max_new_tokens=3), make_job("here", text="b", max_new_tokens=3)]
    outcomes = BatchRun(engine, EventPublisher(connection), jobs).run()
    assert [row.key for row in engine.added[0]] == [("here", 0)]
    assert outcomes["gone"].finish_reasons == ["cancelled"]
    assert outcomes["here"].finish_reasons == ["length"]


class ConstrainedFakeEngine(FakeEngine):
    """Compiles any constraint but a regex holding "bad"."""

    def __init__(self):
        super().__init__()
        self.prepared = []

    def prepare_constraint(self, constraint):
        from worker.engine.grammar import ConstraintError

        if "bad" in constraint.value:
            raise ConstraintError("the outlines backend cannot compile this regex: bad")
        self.prepared.append(constraint)


def test_a_constraint_that_does_not_compile_fails_only_its_request(connection):
    engine = ConstrainedFakeEngine()
    jobs = [
        make_job("ok", text="a b", max_new_tokens=2, regex_string=r"\d+", json_schema={"type": "integer"}),
        make_job("bad", text="c", max_new_tokens=2, regex_string="bad"),
        make_job("json", text="d", max_new_tokens=1, json_schema='{"type": "string", "pattern": "^\\\\d$"}'),
    ]
    pubsub = collect(connection, "bad")
    outcomes = BatchRun(engine, EventPublisher(connection), jobs).run()
    assert outcomes["bad"].error.status == 400
    assert outcomes["bad"].error.error_type == "invalid_constraint"
    assert [event for _, event in drain(pubsub)] == [outcomes["bad"].error]
    assert outcomes["ok"].result()["text"] == ["w1 w2 "]
    # regex wins over json_schema; both are handed over in the shared dialect, compiled before add
    regex, schema = engine.prepared
    assert (regex.kind, regex.value, regex.backend) == ("regex", "[0-9]+", "outlines")
    assert schema.kind == "json_schema" and '"^[0-9]$"' in schema.value
    assert [row.constraint for row in engine.added[0]] == [regex, schema]


def test_a_request_cancelled_before_its_rows_were_prefilled_never_reaches_the_engine(connection):
    engine = FakeEngine()
    run = BatchRun(engine, EventPublisher(connection), max_rows=1)
    run.admit([make_job("first", text="a", max_new_tokens=3), make_job("later", text="b", max_new_tokens=3)])
    assert run.step() == [] and run.waiting_rows == 1
    connection.set(keys.cancel_key("later"), 1)
    (ended,) = run.step()
    assert ended.request_id == "later" and ended.finish_reasons == ["cancelled"]
    while run.has_work:
        run.step()
    assert [row.key for rows in engine.added for row in rows] == [("first", 0)]


def test_a_newcomer_that_fails_to_prefill_fails_alone(connection):
    class RefusesB(FakeEngine):
        def add(self, rows):
            if any(row.key[0] == "b" for row in rows):
                raise RuntimeError("prefill failed")
            super().add(rows)

    run = BatchRun(RefusesB(), EventPublisher(connection))
    run.admit([make_job("a", text="x", max_new_tokens=3)])
    run.step()
    run.admit([make_job("b", text="y", max_new_tokens=3), make_job("c", text="z", max_new_tokens=1)])
    ended = {outcome.request_id: outcome for outcome in run.step()}
    assert ended["b"].error.error_type == "generation_error"
    assert ended["c"].result()["text"] == ["w1 "]
    (last,) = [outcome for _ in range(2) for outcome in run.step()]
    assert last.request_id == "a" and last.result()["text"] == ["w1 w2 w3 "]


def test_newcomers_join_in_the_decode_steps_own_forward_when_the_engine_can(connection):
    engine = FakeEngine(joins_in_step=True)
    run = BatchRun(engine, EventPublisher(connection), max_rows=4)
    run.admit([make_job("a", text="x", max_new_tokens=4)])
    run.step()  # nothing running yet: a plain prefill
    run.admit([make_job("b", text="y", max_new_tokens=2), make_job("c", text=["z", "w"], max_new_tokens=1)])
    assert run.step() == []  # b and c join this step's forward; their first tokens come next step
    assert engine.add_log == [(0, [("a", 0)])]
    assert engine.join_log == [(2, [("b", 0), ("c", 0), ("c", 1)])]
    ended = {outcome.request_id: outcome for _ in range(3) for outcome in run.step()}
    assert ended["a"].result()["text"] == ["w1 w2 w3 w4 "]
    assert ended["b"].result()["text"] == ["w1 w2 "]
    assert ended["c"].result()["text"] == ["w1 ", "w1 "]
    assert run.peak_rows == 4


@pytest.mark.parametrize(
    ("joins_in_step", "prefilled_together"),
    [
        (True, [["long", "short"]]),  # joining rows count their own lengths: 4 + 2 fits 6
        (False, [["long"], ["short"]]),  # a shared prefill pads both to 4: 8 does not fit
    ],
)
def test_the_prefill_budget_counts_padding_only_where_prompts_share_a_prefill(
    connection, joins_in_step, prefilled_together
):
    engine = FakeEngine(joins_in_step=joins_in_step)
    run = BatchRun(engine, EventPublisher(connection), max_rows=4, max_prefill_tokens=6)
    run.admit([make_job("a", text="x", max_new_tokens=6)])
    run.step()
    run.admit(
        [make_job("long", text="p q r s", max_new_tokens=1), make_job("short", text="t u", max_new_tokens=1)]
    )
    run.step()
    run.step()
    newcomers = engine.join_log if joins_in_step else engine.add_log[1:]
    assert [[key[0] for key in keys_] for _, keys_ in newcomers] == prefilled_together


def test_a_newcomer_refused_when_joining_in_a_step_fails_alone(connection):
    class RefusesB(FakeEngine):
        def check(self, rows):
            if any(row.key[0] == "b" for row in rows):
                raise PromptError("b cannot run")
            super().check(rows)

    engine = RefusesB(joins_in_step=True)
    run = BatchRun(engine, EventPublisher(connection))
    run.admit([make_job("a", text="x", max_new_tokens=3)])
    run.step()
    run.admit([make_job("b", text="y", max_new_tokens=3), make_job("c", text="z", max_new_tokens=1)])
    (refused,) = run.step()
    assert refused.request_id == "b" and refused.error.error_type == "invalid_prompt"
    assert engine.join_log == [(2, [("c", 0)])]  # c still joins
    ended = {outcome.request_id: outcome for _ in range(2) for outcome in run.step()}
    assert ended["c"].result()["text"] == ["w1 "]
    assert ended["a"].result()["text"] == ["w1 w2 w3 "]


def test_newcomers_take_the_slots_of_rows_ending_in_the_step_they_join(connection):
    engine = FakeEngine(joins_in_step=True)
    run = BatchRun(engine, EventPublisher(connection), max_rows=2)
    run.admit([make_job("a", text="x", max_new_tokens=2), make_job("b", text="y", max_new_tokens=5)])
    run.step()  # a and b prefilled; a's first token
    run.admit([make_job("c", text="z", max_new_tokens=2), make_job("d", text="w", max_new_tokens=2)])
    (a,) = run.step()  # a's last token: its slot goes to c in this same step; d waits
    assert a.request_id == "a"
    assert engine.join_log == [(2, [("c", 0)])] and run.waiting_rows == 1
    assert engine.peak_rows == 2  # never more rows than --max-batch-size
    run.step()  # c's first token; no slot frees (c and b go on)
    (c,) = run.step()  # c's last: d joins
    assert c.request_id == "c" and engine.join_log[-1] == (4, [("d", 0)])
    while run.has_work:
        run.step()
    assert engine.peak_rows == 2


def test_rows_that_cannot_join_in_a_step_are_prefilled_before_it_and_the_others_join(connection):
    engine = FakeEngine(joins_in_step=True, adapters=frozenset({"x"}))
    run = BatchRun(engine, EventPublisher(connection), max_rows=2)
    run.admit([make_job("a", text="a", max_new_tokens=2)])
    run.step()
    b, d = (make_job(name, text=name, max_new_tokens=2) for name in "bd")
    run.admit([lora_job("c", "x"), b, d])
    (a,) = run.step()  # a ends: its slot goes to b (joins in the step); c took the free slot
    assert a.request_id == "a"
    assert engine.add_log == [(0, [("a", 0)]), (1, [("c", 0)])]
    assert engine.join_log == [(2, [("b", 0)])]
    assert engine.peak_rows == 2 and run.waiting_rows == 1


# -- LoRA adapters ------------------------------------------------------------


def lora_job(request_id: str, lora_id: str | None, max_new_tokens: int = 2) -> GenerationJob:
    return make_job(request_id, text="x", max_new_tokens=max_new_tokens, lora_id=lora_id)


def test_each_row_carries_its_requests_adapter(connection):
    engine = FakeEngine(adapters=frozenset({"alpha", "beta"}))
    run = BatchRun(engine, EventPublisher(connection), [lora_job("a", "alpha"), lora_job("b", None)])
    run.run()
    assert [(row.key[0], row.adapter) for rows in engine.added for row in rows] == [
        ("a", "alpha"),
        ("b", None),
    ]


def test_an_unknown_adapter_fails_only_its_request_before_the_engine(connection):
    engine = FakeEngine(adapters=frozenset({"alpha"}))
    pubsub = collect(connection, "bad")
    outcomes = BatchRun(
        engine, EventPublisher(connection), [lora_job("bad", "gamma"), lora_job("good", "alpha")]
    ).run()
    assert outcomes["bad"].error.error_type == "unknown_lora"
    assert outcomes["bad"].error.status == 404
    assert outcomes["good"].result()["text"] == ["w1 w2 "]
    assert all(row.key[0] != "bad" for rows in engine.added for row in rows)
    ((_, event),) = drain(pubsub)
    assert isinstance(event, events.ErrorEvent) and "gamma" in event.error


def test_a_row_whose_adapter_finds_no_slot_waits_while_others_join(connection):
    engine = FakeEngine(adapters=frozenset({"alpha", "beta", "gamma"}), adapter_slots=1)
    run = BatchRun(engine, EventPublisher(connection), max_rows=8)
    run.admit([lora_job("a", "alpha", max_new_tokens=3)])
    run.step()
    # beta finds no slot: it waits, and the base-model request behind it joins at once
    run.admit([lora_job("b", "beta"), lora_job("plain", None)])
    run.step()
    assert {key[0] for key in engine.rows} == {"a", "plain"}
    assert run.waiting_requests == 1
    ended = [outcome.request_id for _ in range(4) for outcome in run.step()]
    assert ended[:2] == ["a", "plain"] and ended[-1] == "b"


def test_the_oldest_waiting_request_is_not_overtaken_by_other_adapters(connection):
    engine = FakeEngine(adapters=frozenset({"alpha", "beta"}), adapter_slots=1)
    run = BatchRun(engine, EventPublisher(connection), max_rows=8)
    run.admit([lora_job("a1", "alpha", max_new_tokens=3)])
    run.step()
    run.admit([lora_job("b", "beta"), lora_job("a2", "alpha")])
    run.step()
    # b is the oldest waiting request and alpha holds the only slot: a2 (alpha)
    # would keep alpha busy, so it waits behind b
    assert set(engine.rows) == {("a1", 0)}
    order = [outcome.request_id for _ in range(8) for outcome in run.step()]
    assert order == ["a1", "b", "a2"]


def test_an_adapter_slot_taken_between_check_and_prefill_puts_the_rows_back(connection):
    class SlotTakenOnce(FakeEngine):
        refused = False

        def add(self, rows):
            if not self.refused and any(row.adapter == "beta" for row in rows):
                self.refused = True
                raise AdaptersBusy("an operator's load took the slot")
            super().add(rows)

    engine = SlotTakenOnce(adapters=frozenset({"beta"}))
    outcomes = BatchRun(engine, EventPublisher(connection), [lora_job("b", "beta")]).run()
    assert outcomes["b"].error is None
    assert outcomes["b"].result()["text"] == ["w1 w2 "]
