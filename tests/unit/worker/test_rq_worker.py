from __future__ import annotations

import signal
import time
import uuid

import fakeredis
import pytest
import redis
from rq import Queue
from rq.job import JobStatus

from shared import jobs
from shared.payload import JOB_FUNCTION, GenerateRequest, GenerationJob
from tests.support.fake_engine import FakeEngine
from worker.rq_worker import BatchWorker


@pytest.fixture
def connection():
    return fakeredis.FakeRedis()


def enqueue(queue: Queue, **payload) -> str:
    request_id = uuid.uuid4().hex
    job = GenerationJob(
        request_id=request_id, request=GenerateRequest(**payload), seed=1, enqueued_at=time.time()
    )
    jobs.enqueue(queue, job)
    return request_id


def make_worker(connection, engine, **kwargs) -> tuple[BatchWorker, Queue]:
    queue = jobs.queue_for(connection, "primary")
    worker = BatchWorker(
        [queue],
        engine=engine,
        connection=connection,
        max_batch_size=kwargs.pop("max_batch_size", 8),
        batch_duration_millis=kwargs.pop("batch_duration_millis", 0),
        **kwargs,
    )
    return worker, queue


def test_queued_jobs_run_as_one_batch_and_finish_in_rq(connection):
    engine = FakeEngine()
    worker, queue = make_worker(connection, engine)
    ids = [enqueue(queue, text="a b", max_new_tokens=2), enqueue(queue, text=["c", "d"], max_new_tokens=1)]
    worker.work(burst=True)
    assert worker.batches_run == 1
    assert len(engine.added) == 1 and len(engine.added[0]) == 3
    first, second = (queue.fetch_job(job_id) for job_id in ids)
    assert first.get_status() == JobStatus.FINISHED
    assert first.return_value()["text"] == ["w1 w2 "]
    assert second.return_value()["text"] == ["w1 ", "w1 "]
    assert set(queue.finished_job_registry.get_job_ids()) == set(ids)
    assert queue.started_job_registry.get_job_ids() == []
    stats = worker.stats.snapshot()  # published through the reader registry to /metrics
    assert stats.requests_finished == 2 and stats.decode_steps == 2 and stats.tokens_generated == 4


def test_a_job_that_would_overflow_the_batch_waits_for_the_next_one(connection):
    engine = FakeEngine()
    worker, queue = make_worker(connection, engine, max_batch_size=2)
    ids = [enqueue(queue, text="a", max_new_tokens=1) for _ in range(3)]
    worker.work(burst=True)
    assert [len(rows) for rows in engine.added] == [2, 1]
    assert all(queue.fetch_job(job_id).get_status() == JobStatus.FINISHED for job_id in ids)


def test_a_malformed_job_fails_in_rq_without_stopping_the_worker(connection):
    engine = FakeEngine()
    worker, queue = make_worker(connection, engine)
    bad = queue.enqueue(JOB_FUNCTION, kwargs={"job": {"nonsense": True}}).id
    good = enqueue(queue, text="a", max_new_tokens=1)
    worker.work(burst=True)
    assert queue.fetch_job(bad).get_status() == JobStatus.FAILED
    assert queue.fetch_job(good).get_status() == JobStatus.FINISHED


def test_a_request_with_a_bad_prompt_fails_alone(connection):
    engine = FakeEngine(context_length=4)
    worker, queue = make_worker(connection, engine)
    too_long = enqueue(queue, text="a", max_new_tokens=10)
    fine = enqueue(queue, text="a", max_new_tokens=2)
    worker.work(burst=True)
    assert queue.fetch_job(too_long).get_status() == JobStatus.FAILED
    assert queue.fetch_job(fine).get_status() == JobStatus.FINISHED


class ScriptedArrivals(FakeEngine):
    """Runs `arrivals[step]()` after that decode step (a request arriving mid-run)."""

    def __init__(self, arrivals: dict, **kwargs):
        super().__init__(**kwargs)
        self.arrivals = arrivals

    def step(self, joining=(), before_forward=None):
        outputs = super().step(joining, before_forward)
        if self.steps in self.arrivals:
            self.arrivals[self.steps]()
        return outputs


def test_a_job_arriving_mid_run_joins_the_running_batch_and_finishes_first(connection):
    seen = {}
    engine = ScriptedArrivals({})
    worker, queue = make_worker(connection, engine)
    long_job = enqueue(queue, text="long", max_new_tokens=10)

    def arrive():
        seen["short"] = enqueue(queue, text="short", max_new_tokens=2)

    def check():
        seen["started"] = queue.started_job_registry.get_job_ids()
        seen["short status"] = queue.fetch_job(seen["short"]).get_status()
        seen["long running"] = (long_job, 0) in engine.rows

    engine.arrivals = {3: arrive, 6: check}
    worker.work(burst=True)
    assert worker.batches_run == 1
    assert engine.add_log == [(0, [(long_job, 0)]), (3, [(seen["short"], 0)])]
    assert seen["short status"] == JobStatus.FINISHED and seen["long running"]
    assert seen["started"] == [long_job]
    assert queue.fetch_job(long_job).return_value()["text"] == ["".join(f"w{n} " for n in range(1, 11))]
    assert queue.fetch_job(seen["short"]).return_value()["text"] == ["w1 w2 "]


def test_a_job_takes_the_slot_of_a_row_ending_in_the_step_it_joins(connection):
    engine = FakeEngine(joins_in_step=True)
    worker, queue = make_worker(connection, engine, max_batch_size=1)
    first = enqueue(queue, text="a", max_new_tokens=3)
    second = enqueue(queue, text="b", max_new_tokens=2)
    worker.work(burst=True)
    assert worker.batches_run == 1
    # popped while the first row's last token was being sampled, and joined in that step
    assert engine.add_log == [(0, [(first, 0)])]
    assert engine.join_log == [(3, [(second, 0)])]
    assert engine.peak_rows == 1
    assert queue.fetch_job(second).return_value()["text"] == ["w1 w2 "]


def test_the_heartbeat_covers_jobs_that_join_mid_run(connection):
    seen = []
    engine = ScriptedArrivals({})
    worker, queue = make_worker(connection, engine)
    first = enqueue(queue, text="a", max_new_tokens=6)
    engine.arrivals = {
        1: lambda: seen.append(enqueue(queue, text="b", max_new_tokens=3)),
        3: lambda: seen.append(sorted(job.id for job in worker._jobs_in_flight())),
    }
    worker.work(burst=True)
    assert seen[1] == sorted([first, seen[0]])


def test_rows_in_flight_never_exceed_max_batch_size_and_free_slots_admit_newcomers(connection):
    engine = ScriptedArrivals({})
    worker, queue = make_worker(connection, engine, max_batch_size=2)
    ids = [enqueue(queue, text="a", max_new_tokens=n) for n in (2, 5, 3, 1)]
    peak = []
    engine.arrivals = {n: (lambda: peak.append(engine.num_rows)) for n in range(1, 12)}
    worker.work(burst=True)
    assert max(peak) <= 2
    assert [keys_ for _, keys_ in engine.add_log] == [
        [(ids[0], 0), (ids[1], 0)],
        [(ids[2], 0)],
        [(ids[3], 0)],
    ]
    assert [step for step, _ in engine.add_log] == [0, 2, 5]
    assert all(queue.fetch_job(job_id).get_status() == JobStatus.FINISHED for job_id in ids)


def test_a_single_request_takes_turns_with_a_big_batch_request(connection):
    engine = FakeEngine()
    worker, queue = make_worker(connection, engine, max_batch_size=2)
    big = enqueue(queue, text=[f"r{n}" for n in range(6)], max_new_tokens=2)
    single = enqueue(queue, text="s", max_new_tokens=2)
    worker.work(burst=True)
    # the big request's first two rows; when they end, the single request gets
    # one of the free slots (the big request, with no row running, the other)
    assert [keys_ for _, keys_ in engine.add_log[:2]] == [[(big, 0), (big, 1)], [(big, 2), (single, 0)]]
    assert queue.fetch_job(big).return_value()["text"] == ["w1 w2 "] * 6
    assert queue.fetch_job(single).get_status() == JobStatus.FINISHED


def test_the_prefill_budget_spreads_newcomers_over_steps(connection):
    engine = FakeEngine()
    worker, queue = make_worker(connection, engine, max_prefill_tokens_per_step=4)
    ids = [enqueue(queue, text="a b c", max_new_tokens=4) for _ in range(3)]
    worker.work(burst=True)
    assert engine.add_log == [(0, [(ids[0], 0)]), (1, [(ids[1], 0)]), (2, [(ids[2], 0)])]


def test_micro_batching_keeps_newcomers_for_the_next_batch(connection):
    engine = ScriptedArrivals({})
    worker, queue = make_worker(connection, engine, batching="micro")
    enqueue(queue, text="long", max_new_tokens=5)
    engine.arrivals = {2: lambda: enqueue(queue, text="late", max_new_tokens=1)}
    worker.work(burst=True)
    assert worker.batches_run == 2
    assert [step for step, _ in engine.add_log] == [0, 5]


def test_a_stop_request_ends_admission_but_lets_rows_in_flight_finish(connection):
    engine = ScriptedArrivals({})
    worker, queue = make_worker(connection, engine)
    running = enqueue(queue, text="a", max_new_tokens=4)
    late = []

    def stop_then_arrive():
        worker._stop_requested = True
        late.append(enqueue(queue, text="b", max_new_tokens=1))

    engine.arrivals = {1: stop_then_arrive}
    worker.work(burst=True)
    assert queue.fetch_job(running).get_status() == JobStatus.FINISHED
    assert queue.fetch_job(late[0]).get_status() == JobStatus.QUEUED


def test_sigterm_while_idle_never_drops_a_popped_job(connection):
    # RQ would raise StopRequested from the signal handler wherever an idle worker
    # is, also right after its dequeue popped a job; ours only sets the stop flag.
    engine = FakeEngine()
    worker, queue = make_worker(connection, engine)
    request_id = enqueue(queue, text="a b", max_new_tokens=2)
    popped = worker.dequeue_job_and_maintain_ttl(5)
    assert popped is not None and popped[0].id == request_id
    worker.request_stop(signal.SIGTERM, None)  # arrives before the job is started: no exception
    assert worker._stop_requested
    worker.execute_job(*popped)  # what RQ's loop does next with the job in hand
    assert queue.fetch_job(request_id).get_status() == JobStatus.FINISHED


def test_a_stopping_worker_leaves_queued_jobs_for_the_others_and_stops_waiting(connection):
    worker, queue = make_worker(connection, FakeEngine())
    worker.request_stop(signal.SIGTERM, None)
    request_id = enqueue(queue, text="a", max_new_tokens=1)
    started = time.monotonic()
    assert worker.dequeue_job_and_maintain_ttl(5) is None
    assert time.monotonic() - started < 1
    assert queue.get_job_ids() == [request_id]


def test_the_command_listener_stops_at_once_on_a_warm_shutdown(connection):
    """RQ's listener waits 60 s for a message; redis-py's stop() waits for it, so a warm
    shutdown of an idle worker took up to a minute."""
    worker, _ = make_worker(connection, FakeEngine())
    worker.subscribe()
    thread = worker.pubsub_thread
    assert thread.is_alive() and thread.sleep_time <= 1
    worker.unsubscribe()
    thread.join(timeout=3)
    assert not thread.is_alive()


def test_redis_going_away_while_a_batch_is_collected_runs_what_was_claimed(connection, monkeypatch):
    """A Sentinel failover during the batch window used to end the worker (the error left
    RQ's work loop); the jobs claimed run, the others wait in their queue."""
    engine = FakeEngine()
    worker, queue = make_worker(connection, engine, batch_duration_millis=50)
    first, second, third = (enqueue(queue, text=text, max_new_tokens=1) for text in "abc")
    pops = []

    def pop_once_then_fail():
        pops.append(1)
        if len(pops) > 1:
            raise redis.ConnectionError("Connection refused")
        return type(worker)._pop_job(worker)

    monkeypatch.setattr(worker, "_pop_job", pop_once_then_fail)
    job, job_queue = worker.dequeue_job_and_maintain_ttl(None)
    worker.execute_job(job, job_queue)
    assert queue.fetch_job(first).get_status() == JobStatus.FINISHED
    assert queue.fetch_job(second).get_status() == JobStatus.FINISHED  # taken by the one pop before
    assert queue.fetch_job(third).get_status() == JobStatus.QUEUED  # for the next batch
    assert len(engine.added[0]) == 2
