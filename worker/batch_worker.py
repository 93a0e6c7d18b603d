"""An RQ worker that runs jobs in micro-batches.

It extends RQ's SimpleWorker (the model stays loaded in this process; no fork
per job): after RQ hands it one job, it keeps popping jobs from its queue for
up to `batch_duration_millis` or until `max_batch_size` rows are collected, then
runs them together. Every job still goes through RQ's own bookkeeping
(executions, StartedJobRegistry, heartbeats, FinishedJobRegistry /
FailedJobRegistry), so `rq info` and rq-dashboard show the truth."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from pydantic import ValidationError
from rq import Queue
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from shared.events import ErrorEvent
from shared.payload import GenerationJob
from worker.batch_run import BatchRun, RequestOutcome
from worker.engine.engine import Engine
from worker.publisher import EventPublisher

log = logging.getLogger(__name__)

WORKER_TTL_SECONDS = 30  # RQ blocks up to WORKER_TTL - 15 s waiting for a job
JOB_MONITORING_INTERVAL_SECONDS = 5  # heartbeat period while a batch runs
POLL_INTERVAL_SECONDS = 0.002


class BatchWorker(SimpleWorker):
    def __init__(
        self,
        queues,
        *,
        engine: Engine,
        max_batch_size: int,
        batch_duration_millis: int,
        **kwargs,
    ):
        kwargs.setdefault("worker_ttl", WORKER_TTL_SECONDS)
        kwargs.setdefault("job_monitoring_interval", JOB_MONITORING_INTERVAL_SECONDS)
        super().__init__(queues, serializer=JSONSerializer, **kwargs)
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_duration = batch_duration_millis / 1000.0
        self.publisher = EventPublisher(self.connection)
        self._executions: dict[str, Execution] = {}
        self.batches_run = 0

    # RQ calls this with the first job it dequeued.
    def execute_job(self, job: Job, queue: Queue) -> None:
        claimed = [(job, queue), *self._collect_more(self._rows_of(job))]
        try:
            self._run_batch(claimed)
        finally:
            self._executions.clear()
            self.set_state(WorkerStatus.IDLE)

    def _rows_of(self, job: Job) -> int:
        payload = job.kwargs.get("job", {}) if isinstance(job.kwargs, dict) else {}
        text = payload.get("request", {}).get("text") if isinstance(payload, dict) else None
        return len(text) if isinstance(text, list) else 1

    def _collect_more(self, rows: int) -> list[tuple[Job, Queue]]:
        """Pop more jobs, without blocking, until the batch is full or the window closes.
        A job that would overflow the batch goes back to the front of its queue."""
        claimed: list[tuple[Job, Queue]] = []
        deadline = time.monotonic() + self.batch_duration
        while rows < self.max_batch_size:
            result = self.queue_class.dequeue_any(
                self._ordered_queues,
                None,
                connection=self.connection,
                job_class=self.job_class,
                serializer=self.serializer,
            )
            if result is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(POLL_INTERVAL_SECONDS, remaining))
                continue
            job, queue = result
            job_rows = self._rows_of(job)
            if rows + job_rows > self.max_batch_size:
                self._hand_back(job, queue)
                break
            rows += job_rows
            claimed.append(result)
        return claimed

    def _hand_back(self, job: Job, queue: Queue) -> None:
        with self.connection.pipeline() as pipe:
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.lpush(queue.key, job.id)
            pipe.execute()

    def _run_batch(self, claimed: list[tuple[Job, Queue]]) -> None:
        started = []
        for job, queue in claimed:
            self._executions[job.id] = self.prepare_execution(job)
            self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
            job.started_at = now()
            started.append((job, queue))

        runnable: list[tuple[Job, Queue, GenerationJob]] = []
        for job, queue in started:
            try:
                runnable.append((job, queue, GenerationJob.model_validate(job.kwargs["job"])))
            except (ValidationError, KeyError, TypeError) as exc:
                error = ErrorEvent(error=f"malformed job: {exc}", error_type="bad_job", status=500)
                self.publisher.publish([(job.id, error)])
                self._finish_failed(job, queue, f"malformed job: {exc}")

        if not runnable:
            return
        rows = sum(len(generation.request.texts) for _, _, generation in runnable)
        log.info("running a batch of %d request(s), %d row(s)", len(runnable), rows)
        run = BatchRun(
            self.engine,
            self.publisher,
            [generation for _, _, generation in runnable],
            on_step=lambda: self._keep_alive([job for job, _, _ in runnable]),
        )
        outcomes = run.run()
        self.batches_run += 1
        for job, queue, generation in runnable:
            self._finish(job, queue, outcomes[generation.request_id])

    def _keep_alive(self, jobs: list[Job]) -> None:
        """Refresh RQ heartbeats of every job in a long batch."""
        if self.last_heartbeat and now() - self.last_heartbeat < timedelta(
            seconds=self.job_monitoring_interval
        ):
            return
        for job in jobs:
            self.execution = self._executions.get(job.id)
            if self.execution is not None:
                self.maintain_heartbeats(job)

    def _finish(self, job: Job, queue: Queue, outcome: RequestOutcome) -> None:
        if outcome.error is not None:
            self._finish_failed(job, queue, f"{outcome.error.error_type}: {outcome.error.error}")
            return
        self.execution = self._executions.get(job.id)
        self.handle_execution_ended(job, queue, job.success_callback_timeout)
        job._result = outcome.result()
        job._status = JobStatus.FINISHED
        self.handle_job_success(job=job, queue=queue, started_job_registry=queue.started_job_registry)

    def _finish_failed(self, job: Job, queue: Queue, reason: str) -> None:
        self.execution = self._executions.get(job.id)
        self.handle_execution_ended(job, queue, job.failure_callback_timeout)
        job._status = JobStatus.FAILED
        self.handle_job_failure(
            job=job, queue=queue, started_job_registry=queue.started_job_registry, exc_string=reason
        )
