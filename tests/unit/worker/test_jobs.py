"""The job function path stored in Redis with every queued job must keep resolving,
so that jobs queued before an upgrade still reach a worker that explains itself."""

from __future__ import annotations

import time

import fakeredis
import pytest
from rq import SimpleWorker
from rq.job import JobStatus
from rq.utils import import_attribute

from shared import jobs
from shared.payload import JOB_FUNCTION, GenerateRequest, GenerationJob
from worker.jobs import NotABatchWorker, generate

STORED_PATH = "worker.jobs.generate"  # what jobs queued by earlier releases name


def test_the_stored_path_resolves_through_rqs_own_import_to_the_refusing_function():
    assert import_attribute(STORED_PATH) is generate
    assert import_attribute(JOB_FUNCTION) is generate
    with pytest.raises(NotABatchWorker, match="mmserve worker"):
        import_attribute(STORED_PATH)(job={})


def test_a_plain_rq_worker_fails_a_queued_generation_job_with_the_explanation():
    connection = fakeredis.FakeRedis()
    queue = jobs.queue_for(connection, "primary")
    job = GenerationJob(
        request_id="queued-before-upgrade",
        request=GenerateRequest(text="hi", max_new_tokens=1),
        seed=1,
        enqueued_at=time.time(),
    )
    queued = jobs.enqueue(queue, job)
    assert queued.func_name == STORED_PATH
    SimpleWorker([queue], connection=connection, serializer=queue.serializer).work(burst=True)
    failed = queue.fetch_job(job.request_id)
    assert failed.get_status() == JobStatus.FAILED
    assert "NotABatchWorker" in failed.latest_result().exc_string
