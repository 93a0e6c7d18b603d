"""Jobs routed to one reader: they belong to the group's queue, count as waiting, and go
back to the group's queue, in order, when their reader is gone (shared.jobs)."""

from __future__ import annotations

import fakeredis
import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from shared import jobs, keys
from shared.payload import GenerateRequest, GenerationJob


def job(request_id: str) -> GenerationJob:
    return GenerationJob(request_id=request_id, request=GenerateRequest(text="hi"), seed=1, enqueued_at=0.0)


@pytest.fixture
def connection():
    return fakeredis.FakeRedis()


def test_a_routed_job_belongs_to_the_groups_queue_but_waits_on_the_readers(connection):
    group = jobs.queue_for(connection, "primary")
    own = jobs.open_reader_queue(connection, "primary", "w1")
    jobs.enqueue(group, job("a"), own)
    assert connection.lrange(group.key, 0, -1) == []
    assert connection.lrange(own.key, 0, -1) == [b"a"]
    stored = Job.fetch("a", connection=connection, serializer=JSONSerializer)
    assert stored.origin == group.name and stored.get_status() == "queued"
    jobs.enqueue(group, job("b"))
    assert jobs.waiting(connection, "primary") == 2


def test_the_queues_of_readers_that_are_gone_move_back_in_order(connection):
    group = jobs.queue_for(connection, "primary")
    dead = jobs.open_reader_queue(connection, "primary", "dead")
    live = jobs.open_reader_queue(connection, "primary", "live")
    jobs.enqueue(group, job("first"))
    for name in ("d1", "d2"):
        jobs.enqueue(group, job(name), dead)
    jobs.enqueue(group, job("l1"), live)
    assert jobs.requeue_orphans(connection, "primary", live_readers={"live"}) == 2
    assert connection.lrange(group.key, 0, -1) == [b"d1", b"d2", b"first"]  # they waited longest
    assert connection.lrange(live.key, 0, -1) == [b"l1"]
    assert connection.smembers(keys.reader_queues_key("primary")) == {b"live"}
    assert jobs.waiting(connection, "primary") == 4


def test_a_reader_closing_its_queue_hands_its_jobs_to_the_group(connection):
    group = jobs.queue_for(connection, "primary")
    own = jobs.open_reader_queue(connection, "primary", "w1")
    jobs.enqueue(group, job("a"), own)
    assert jobs.close_reader_queue(connection, "primary", "w1") == 1
    assert connection.lrange(group.key, 0, -1) == [b"a"]
    assert not connection.smembers(keys.reader_queues_key("primary"))
