"""BatchWorker: the RQ worker that runs generation jobs in batches.

It extends RQ's SimpleWorker (the model stays loaded in this process; no fork per
job): after RQ hands it one job, it pops more without blocking, for up to
`batch_duration_millis` or until the batch is full, and runs them together; with
continuous batching it pops more between decode steps whenever worker.scheduler
finds room. Every job still goes through RQ's own bookkeeping (executions,
registries, heartbeats, retries), so `rq info` and rq-dashboard show the truth. On
SIGTERM the worker stops admitting, finishes the rows in flight and exits.

Easy to get wrong: a crashed worker's jobs are re-run, not lost. While a batch runs,
a thread refreshes every job's RQ heartbeat; once they stop, another worker's
registry sweep re-queues the jobs (RQ retries), the re-run repeats the same tokens
(same seed) and the API relays each token sequence number once. After the last
attempt the sweep publishes an error event so that no client waits forever."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from pydantic import ValidationError
from rq import Queue
from rq.exceptions import DequeueTimeout, NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from shared import defaults
from shared.events import ErrorEvent
from shared.payload import GenerationJob
from worker.batch_run import BatchRun, RequestOutcome
from worker.engine.engine import Engine
from worker.publisher import EventPublisher
from worker.scheduler import Scheduler
from worker.stats import StatsRecorder

log = logging.getLogger(__name__)


def _while_redis_is_away(what: str, action: Callable[[], object]) -> None:
    """Run `action`; when Redis cannot be reached, log that `what` was skipped."""
    try:
        action()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("%s skipped: Redis unavailable (%s)", what, exc)


WORKER_TTL_SECONDS = 20  # RQ blocks up to WORKER_TTL - 15 s waiting for a job, then sweeps
POLL_INTERVAL_SECONDS = 0.002
OWN_QUEUE_POLL_SECONDS = 0.05  # an idle worker looks at its own queue this often
PUBSUB_WAKE_SECONDS = 1.0  # the worker-command listener looks at its stop flag this often


class ReaderQueues(Queue):
    """A worker's queues: its own (jobs routed to it, shared.jobs) first, its group's
    last. A job is taken as RQ takes one from a single queue, moved into the group's
    intermediate queue, so that if the worker dies before starting it, RQ's cleanup of
    that queue (by any worker of the group) hands it to another; it is returned as the
    group's, whose registries, retries and failed jobs every worker of the group sees.
    RQ itself pops several queues without an intermediate queue. Waiting blocks on the
    group's queue and looks at the worker's own every OWN_QUEUE_POLL_SECONDS."""

    @classmethod
    def dequeue_any(
        cls, queues, timeout, connection, job_class=None, serializer=None, death_penalty_class=None
    ):
        *own, group = list(queues)
        waited = 0.0
        while True:
            job_id = None
            for queue in [*own, group]:
                job_id = connection.lmove(queue.key, group.intermediate_queue_key, "LEFT", "RIGHT")
                if job_id is not None:
                    break
            if job_id is None:
                if timeout is None:
                    return None
                wait = OWN_QUEUE_POLL_SECONDS if own else float(timeout)
                job_id = connection.blmove(group.key, group.intermediate_queue_key, wait, "LEFT", "RIGHT")
                waited += wait
                if job_id is None:
                    if waited >= timeout:
                        raise DequeueTimeout(timeout, group.key)
                    continue
            try:
                job = (job_class or Job).fetch(job_id.decode(), connection=connection, serializer=serializer)
            except NoSuchJobError:
                connection.lrem(group.intermediate_queue_key, 1, job_id)
                continue
            return job, group


class BatchWorker(SimpleWorker):
    queue_class = ReaderQueues  # how it takes jobs; queues may be given as plain RQ queues too

    def validate_queues(self) -> None:
        for queue in self.queues:
            if not isinstance(queue, Queue):
                raise TypeError(f"{queue} is not an RQ queue")

    def __init__(
        self,
        queues,
        *,
        engine: Engine,
        max_batch_size: int,
        batch_duration_millis: int,
        batching: str = defaults.DEFAULT_BATCHING,
        max_prefill_tokens_per_step: int = defaults.DEFAULT_MAX_PREFILL_TOKENS_PER_STEP,
        **kwargs,
    ):
        kwargs.setdefault("worker_ttl", WORKER_TTL_SECONDS)
        kwargs.setdefault("job_monitoring_interval", int(defaults.JOB_HEARTBEAT_SECONDS))
        kwargs.setdefault("maintenance_interval", defaults.ABANDONED_JOB_SWEEP_SECONDS)
        super().__init__(queues, serializer=JSONSerializer, **kwargs)
        self.engine = engine
        # not `self.scheduler`: RQ's Worker keeps its job scheduler (RQScheduler) there
        self.batch_scheduler = Scheduler(
            max_rows=max_batch_size, max_prefill_tokens=max_prefill_tokens_per_step, batching=batching
        )
        self.batch_duration = batch_duration_millis / 1000.0
        self._in_flight: dict[str, tuple[Job, Queue]] = {}  # continuous batching: jobs started, by id
        self.publisher = EventPublisher(self.connection)
        self.stats = StatsRecorder()
        self._executions: dict[str, Execution] = {}
        self.batches_run = 0
        self.push_exc_handler(self._report_abandoned)

    # -- warm shutdown ---------------------------------------------------------
    #
    # RQ answers SIGTERM in an idle worker by raising StopRequested from the
    # signal handler, wherever the worker is: also just after its dequeue has
    # popped a job (or while we collect a batch), which then runs nowhere until
    # RQ's intermediate-queue cleanup fails it a minute or more later. Instead,
    # SIGTERM only sets the stop flag, and the wait for a job is cut into
    # one-second slices that look at the flag.

    def _shutdown(self) -> None:
        self._stop_requested = True
        self.set_shutdown_requested_date()

    def subscribe(self) -> None:
        """RQ's listener for worker commands, woken every PUBSUB_WAKE_SECONDS instead of RQ's 60:
        redis-py's PubSubWorkerThread.stop() waits for the thread, which a warm shutdown would
        otherwise wait for up to a minute (and `serve` kill after its grace period)."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=PUBSUB_WAKE_SECONDS, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        if timeout is None:  # burst mode: one non-blocking look
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        waited = 0
        while not self._stop_requested:
            if max_idle_time is not None and waited >= max_idle_time:
                return None
            result = super().dequeue_job_and_maintain_ttl(1, max_idle_time=1)
            if result is not None:
                return result
            waited += 1
        return None

    def get_heartbeat_ttl(self, job: Job) -> int:
        """Short, so a dead worker's jobs are found abandoned within seconds."""
        return defaults.JOB_HEARTBEAT_TTL_SECONDS

    # -- Redis going away ------------------------------------------------------
    #
    # RQ's work loop quits on any exception but those of its own dequeue, which
    # waits for Redis to come back. A Redis restart or a Sentinel failover would
    # then end the worker at its next bookkeeping write; these writes are skipped
    # while Redis is away instead (each is made again later).

    def set_state(self, state: str, pipeline=None) -> None:
        _while_redis_is_away(
            f"recording the worker {state}", lambda: super(BatchWorker, self).set_state(state, pipeline)
        )

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        _while_redis_is_away(
            "the worker heartbeat", lambda: super(BatchWorker, self).heartbeat(timeout, pipeline)
        )

    def check_for_suspension(self, burst: bool) -> None:
        _while_redis_is_away(
            "looking for a suspension", lambda: super(BatchWorker, self).check_for_suspension(burst)
        )

    def run_maintenance_tasks(self) -> None:
        _while_redis_is_away("RQ's maintenance", super().run_maintenance_tasks)

    # RQ calls this with the first job it dequeued.
    def execute_job(self, job: Job, queue: Queue) -> None:
        claimed = [(job, queue), *self._collect_more(self._rows_of(job))]
        try:
            if self.batch_scheduler.admits_mid_run:
                self._run_continuous(claimed)
            else:
                self._run_batch(claimed)
        finally:
            self._executions.clear()
            self._in_flight.clear()
            self.set_state(WorkerStatus.IDLE)

    def _rows_of(self, job: Job) -> int:
        payload = job.kwargs.get("job", {}) if isinstance(job.kwargs, dict) else {}
        text = payload.get("request", {}).get("text") if isinstance(payload, dict) else None
        return len(text) if isinstance(text, list) else 1

    def _collect_more(self, rows: int) -> list[tuple[Job, Queue]]:
        """Pop more jobs, without blocking, until the batch is full, the window closes or
        Redis cannot be reached. A job that would overflow the batch goes back to the front
        of its queue."""
        claimed: list[tuple[Job, Queue]] = []
        deadline = time.monotonic() + self.batch_duration
        while not self.batch_scheduler.is_full(rows):
            try:
                result = self._pop_job()
            except redis.RedisError as exc:  # Redis away (a failover): run what is claimed
                log.warning("could not collect more jobs for the batch: %s", exc)
                break
            if result is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(POLL_INTERVAL_SECONDS, remaining))
                continue
            job, queue = result
            job_rows = self._rows_of(job)
            if self.batch_scheduler.overflows(rows, job_rows):
                self._hand_back(job, queue)
                break
            rows += job_rows
            claimed.append(result)
        return claimed

    def _pop_job(self) -> tuple[Job, Queue] | None:
        """The next job of this worker's queues, without blocking (RQ's own dequeue)."""
        return self.queue_class.dequeue_any(
            self._ordered_queues,
            None,
            connection=self.connection,
            job_class=self.job_class,
            serializer=self.serializer,
        )

    def _hand_back(self, job: Job, queue: Queue) -> None:
        with self.connection.pipeline() as pipe:
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.lpush(queue.key, job.id)
            pipe.execute()

    def _run_batch(self, claimed: list[tuple[Job, Queue]]) -> None:
        runnable = self._start(claimed)
        if not runnable:
            return
        rows = sum(len(generation.request.texts) for _, _, generation in runnable)
        log.info("running a batch of %d request(s), %d row(s)", len(runnable), rows)
        run = BatchRun(
            self.engine, self.publisher, [generation for _, _, generation in runnable], stats=self.stats
        )
        with _JobHeartbeats(self, lambda: [job for job, _, _ in runnable]):
            outcomes = run.run()
        self.batches_run += 1
        for job, queue, generation in runnable:
            self._end_job(job, queue, outcomes[generation.request_id])

    def _run_continuous(self, claimed: list[tuple[Job, Queue]]) -> None:
        """One running batch, until no row is left: admit, step, finish jobs as they end."""
        run = BatchRun(
            self.engine,
            self.publisher,
            max_rows=self.batch_scheduler.max_rows,
            max_prefill_tokens=self.batch_scheduler.max_prefill_tokens,
            stats=self.stats,
        )
        admitted = self._admit(run, claimed)
        if not admitted and not run.has_work:
            return
        log.info(
            "running a batch of %d request(s), %d row(s) (continuous batching)",
            admitted,
            run.running_rows + run.waiting_rows,
        )
        with _JobHeartbeats(self, self._jobs_in_flight):
            while run.has_work:
                if not self._stop_requested and self.batch_scheduler.room_for_another_job(run.load):
                    try:
                        self._admit_newcomers(run)
                    except redis.RedisError as exc:  # the rows in flight go on; retry next step
                        log.warning("could not look for new jobs: %s", exc)
                for outcome in run.step():
                    self._end_job(*self._in_flight.pop(outcome.request_id), outcome)
        self.batches_run += 1

    def _jobs_in_flight(self) -> list[Job]:
        """The jobs a continuous run holds now (called from the heartbeat thread)."""
        return [job for job, _ in list(self._in_flight.values())]

    def _admit_newcomers(self, run: BatchRun) -> None:
        joined = 0
        while self.batch_scheduler.room_for_another_job(run.load):
            result = self._pop_job()
            if result is None:
                break
            joined += self._admit(run, [result])
        if joined:
            log.info(
                "%d request(s) joined the running batch (%d row(s) running, %d waiting)",
                joined,
                run.running_rows,
                run.waiting_rows,
            )

    def _admit(self, run: BatchRun, claimed: list[tuple[Job, Queue]]) -> int:
        """Start `claimed` in RQ and hand them to `run`; how many were runnable."""
        runnable = self._start(claimed)
        for job, queue, generation in runnable:
            self._in_flight[generation.request_id] = (job, queue)
        for outcome in run.admit([generation for _, _, generation in runnable]):
            self._end_job(*self._in_flight.pop(outcome.request_id), outcome)
        return len(runnable)

    def _end_job(self, job: Job, queue: Queue, outcome: RequestOutcome) -> None:
        self.stats.record_request(failed=outcome.error is not None)
        if outcome.error is not None:
            log.info("job %s failed: %s (%s)", job.id, outcome.error.error_type, outcome.error.error)
        else:
            tokens = sum(usage.completion_tokens for usage in outcome.usage if usage is not None)
            log.info(
                "job %s done: %d row(s), %d token(s), %s",
                job.id,
                len(outcome.finish_reasons),
                tokens,
                ",".join(str(reason) for reason in outcome.finish_reasons),
            )
        try:
            self._finish(job, queue, outcome)
        except redis.RedisError as exc:
            # Redis went away at the end of the job: RQ's sweep will find it
            # abandoned once Redis is back, and retry it.
            log.warning("could not record the end of job %s: %s", job.id, exc)
        finally:
            self._executions.pop(job.id, None)

    def _start(self, claimed: list[tuple[Job, Queue]]) -> list[tuple[Job, Queue, GenerationJob]]:
        """Start `claimed` jobs in RQ; the runnable ones with their payloads
        (a malformed job fails at once)."""
        started = []
        for job, queue in claimed:
            self._executions[job.id] = self.prepare_execution(job)
            self.prepare_job_execution(job, remove_from_intermediate_queue=True)
            job.started_at = now()
            started.append((job, queue))

        runnable: list[tuple[Job, Queue, GenerationJob]] = []
        for job, queue in started:
            try:
                runnable.append((job, queue, GenerationJob.model_validate(job.kwargs["job"])))
                log.info("job %s started", job.id)
            except (ValidationError, KeyError, TypeError) as exc:
                error = ErrorEvent(error=f"malformed job: {exc}", error_type="bad_job", status=500)
                self.publisher.publish([(job.id, error)])
                self._finish_failed(job, queue, f"malformed job: {exc}")
        return runnable

    def beat(self, jobs: list[Job]) -> None:
        """Refresh the RQ heartbeats of a running batch (worker, executions, jobs)."""
        ttl = defaults.JOB_HEARTBEAT_TTL_SECONDS
        with self.connection.pipeline() as pipe:
            self.heartbeat(self.worker_ttl + 60, pipeline=pipe)
            for job in jobs:
                execution = self._executions.get(job.id)
                if execution is not None:
                    execution.heartbeat(job.started_job_registry, ttl, pipeline=pipe)
                job.heartbeat(now(), ttl, pipeline=pipe, xx=True)
            pipe.execute()

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
        """A failure the client has already been told about: never retried."""
        self.execution = self._executions.get(job.id)
        self.handle_execution_ended(job, queue, job.failure_callback_timeout)
        job._status = JobStatus.FAILED
        job.retries_left = 0
        self.handle_job_failure(
            job=job, queue=queue, started_job_registry=queue.started_job_registry, exc_string=reason
        )

    def _report_abandoned(self, job: Job, exc_type, exc_value, traceback) -> bool:
        """RQ calls this when its sweep finds a job whose worker died. On the last
        attempt, tell the waiting client instead of leaving it hanging."""
        if not job.retries_left:
            attempts = defaults.JOB_MAX_ATTEMPTS
            log.warning("job %s abandoned by its worker on the last attempt; failing it", job.id)
            error = ErrorEvent(
                error=f"the worker running this request died {attempts} time(s); giving up",
                error_type="worker_lost",
                status=503,
            )
            try:
                self.publisher.publish([(job.id, error)])
            except redis.RedisError as publish_error:
                log.warning("could not report job %s as failed: %s", job.id, publish_error)
        else:
            log.warning(
                "job %s abandoned by its worker; re-queueing (%d attempt(s) left)", job.id, job.retries_left
            )
        return True


class _JobHeartbeats:
    """Keeps a batch's jobs alive in RQ while the decode loop runs, and runs
    RQ's registry sweep (abandoned jobs of dead workers) when it is due."""

    def __init__(self, worker: BatchWorker, jobs: Callable[[], list[Job]]):
        """`jobs` tells which jobs are in flight now (continuous batching changes them)."""
        self._worker = worker
        self._jobs = jobs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-heartbeats", daemon=True)

    def __enter__(self) -> _JobHeartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(defaults.JOB_HEARTBEAT_SECONDS):
            try:
                self._worker.beat(self._jobs())
                if self._worker.should_run_maintenance_tasks:
                    self._worker.clean_registries()
            except redis.RedisError as exc:
                log.warning("job heartbeats failed (will retry): %s", exc)
