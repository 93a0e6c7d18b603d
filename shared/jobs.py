"""How a generation request becomes an RQ job: the group's queue (JSON, never
pickle) and the job's lifetimes and retries, in one place for the API (and
the tests and benchmarks that enqueue as the API does)."""

from __future__ import annotations

import redis
import rq
from rq.serializers import JSONSerializer

from shared import defaults, keys
from shared.payload import JOB_FUNCTION, GenerationJob


def queue_for(connection: redis.Redis, consumer_group: str) -> rq.Queue:
    """The RQ queue feeding a consumer group, JSON-serialised (never pickle)."""
    return rq.Queue(keys.queue_name(consumer_group), connection=connection, serializer=JSONSerializer)


def enqueue(queue: rq.Queue, job: GenerationJob) -> rq.job.Job:
    """One RQ job for one request: its id is the request id; it expires if no worker
    takes it in time, and is re-run (same seed) up to JOB_MAX_ATTEMPTS if its worker dies."""
    return queue.enqueue(
        JOB_FUNCTION,
        kwargs={"job": job.model_dump(mode="json")},
        job_id=job.request_id,
        ttl=defaults.JOB_TTL_SECONDS,
        result_ttl=defaults.JOB_RESULT_TTL_SECONDS,
        failure_ttl=defaults.JOB_FAILURE_TTL_SECONDS,
        job_timeout=defaults.JOB_TIMEOUT_SECONDS,
        retry=rq.Retry(max=defaults.JOB_MAX_ATTEMPTS - 1),
    )
