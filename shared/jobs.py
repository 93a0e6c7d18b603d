"""How a generation request becomes an RQ job: the group's queue (JSON, never
pickle), the job's lifetimes and retries, and the queues of single readers, in one
place for the API, the workers (and the tests and benchmarks that enqueue as the API
does).

A job may be routed to one reader of its group (the one that likely holds its prompt's
prefix in its cache): its id goes on that reader's queue, which the reader takes before
the group's, while the job itself belongs to the group's queue (its `origin`), so
RQ's registries, retries and failed jobs are the group's as for any other job. A
reader's queue outlives the reader only until a live reader of the group moves it back
to the group's queue (`requeue_orphans`)."""

from __future__ import annotations

from collections.abc import Collection

import redis
import rq
from rq.serializers import JSONSerializer

from shared import defaults, keys
from shared.payload import JOB_FUNCTION, GenerationJob


def queue_for(connection: redis.Redis, consumer_group: str) -> rq.Queue:
    """The RQ queue feeding a consumer group, JSON-serialised (never pickle)."""
    return rq.Queue(keys.queue_name(consumer_group), connection=connection, serializer=JSONSerializer)


def reader_queue_for(connection: redis.Redis, consumer_group: str, reader_id: str) -> rq.Queue:
    """The queue of one reader of a group (jobs routed to it)."""
    name = keys.reader_queue_name(consumer_group, reader_id)
    return rq.Queue(name, connection=connection, serializer=JSONSerializer)


def enqueue(queue: rq.Queue, job: GenerationJob, reader_queue: rq.Queue | None = None) -> rq.job.Job:
    """One RQ job for one request: its id is the request id; it expires if no worker
    takes it in time, and is re-run (same seed) up to JOB_MAX_ATTEMPTS if its worker dies.
    With `reader_queue` the job belongs to `queue` but waits on `reader_queue` (in one
    transaction: no worker of the group sees it on `queue` meanwhile)."""
    options = {
        "kwargs": {"job": job.model_dump(mode="json")},
        "job_id": job.request_id,
        "ttl": defaults.JOB_TTL_SECONDS,
        "result_ttl": defaults.JOB_RESULT_TTL_SECONDS,
        "failure_ttl": defaults.JOB_FAILURE_TTL_SECONDS,
        "job_timeout": defaults.JOB_TIMEOUT_SECONDS,
        "retry": rq.Retry(max=defaults.JOB_MAX_ATTEMPTS - 1),
    }
    if reader_queue is None:
        return queue.enqueue(JOB_FUNCTION, **options)
    with queue.connection.pipeline() as pipe:
        enqueued = queue.enqueue(JOB_FUNCTION, pipeline=pipe, **options)
        pipe.lrem(queue.key, 1, job.request_id)
        pipe.rpush(reader_queue.key, job.request_id)
        pipe.execute()
    return enqueued


def waiting(connection: redis.Redis, consumer_group: str) -> int:
    """Jobs of a group no worker has taken yet: on its queue and its readers' queues."""
    readers = [reader.decode() for reader in connection.smembers(keys.reader_queues_key(consumer_group))]
    with connection.pipeline(transaction=False) as pipe:
        pipe.llen(queue_for(connection, consumer_group).key)
        for reader_id in readers:
            pipe.llen(reader_queue_for(connection, consumer_group, reader_id).key)
        return sum(pipe.execute())


def open_reader_queue(connection: redis.Redis, consumer_group: str, reader_id: str) -> rq.Queue:
    """Make a reader's own queue known to its group (so that it is requeued if the reader dies)."""
    connection.sadd(keys.reader_queues_key(consumer_group), reader_id)
    return reader_queue_for(connection, consumer_group, reader_id)


def close_reader_queue(connection: redis.Redis, consumer_group: str, reader_id: str) -> int:
    """Move a reader's waiting jobs to the front of its group's queue, in order, and
    forget its queue; how many moved."""
    source = reader_queue_for(connection, consumer_group, reader_id).key
    target = queue_for(connection, consumer_group).key
    moved = 0
    while connection.lmove(source, target, "RIGHT", "LEFT") is not None:
        moved += 1
    connection.srem(keys.reader_queues_key(consumer_group), reader_id)
    if connection.llen(source):  # a job routed to it meanwhile: it stays known
        connection.sadd(keys.reader_queues_key(consumer_group), reader_id)
    return moved


def requeue_orphans(connection: redis.Redis, consumer_group: str, live_readers: Collection[str]) -> int:
    """Move the jobs waiting on the queues of the group's readers that are not live
    back to the group's queue; how many moved."""
    known = {reader.decode() for reader in connection.smembers(keys.reader_queues_key(consumer_group))}
    return sum(close_reader_queue(connection, consumer_group, reader) for reader in known - set(live_readers))


ENDED_STATUSES = frozenset({"finished", "failed", "stopped", "canceled"})
"""RQ job statuses after which the job's worker publishes no more events."""


def job_status(connection: redis.Redis, request_id: str) -> str | None:
    """The RQ status of a request's job ("queued", "started", "finished", ...); None when Redis
    no longer has the job (its result expired, or it was lost with a Redis that failed over)."""
    status = connection.hget(rq.job.Job.key_for(request_id), "status")
    return status.decode() if isinstance(status, bytes) else status
