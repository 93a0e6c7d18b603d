"""The function every generation job names (shared.payload.JOB_FUNCTION).

mmserve's BatchWorker never calls it: it reads the job's arguments and runs
many jobs together through the engine. A plain `rq worker` that picks up a
generation job by mistake fails it with this explanation instead of hanging.

Easy to get wrong: RQ stores this function's dotted path with every queued job,
so it must stay importable as `worker.jobs.generate` for jobs queued before an
upgrade."""

from __future__ import annotations

from typing import Any


class NotABatchWorker(RuntimeError):
    pass


def generate(job: dict[str, Any]) -> dict[str, Any]:
    raise NotABatchWorker(
        "mmserve generation jobs run in batches inside `mmserve worker`; "
        "a plain RQ worker cannot run them. Start workers with `mmserve worker`."
    )
