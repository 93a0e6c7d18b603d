from __future__ import annotations

import time
import uuid

import fakeredis
import pytest
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from shared import keys, limits
from shared.payload import JOB_FUNCTION, GenerateRequest, GenerationJob
from tests.unit.worker.fake_engine import FakeEngine
from worker.batch_worker import BatchWorker


@pytest.fixture
def connection():
    return fakeredis.FakeRedis()


def enqueue(queue: Queue, **payload) -> str:
    request_id = uuid.uuid4().hex
    job = GenerationJob(
        request_id=request_id, request=GenerateRequest(**payload), seed=1, enqueued_at=time.time()
    )
    queue.enqueue(
        JOB_FUNCTION,
        kwargs={"job": job.model_dump(mode="json")},
        job_id=request_id,
        ttl=limits.JOB_TTL_SECONDS,
        result_ttl=limits.JOB_RESULT_TTL_SECONDS,
    )
    return request_id


def make_worker(connection, engine, **kwargs) -> tuple[BatchWorker, Queue]:
    queue = Queue(keys.queue_name("primary"), connection=connection, serializer=JSONSerializer)
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
