"""One path from a validated request to a queued job and its event stream,
used by the Takeoff and the OpenAI routes alike: `start_generation` checks the
request, stores its images, enqueues its job and returns a `Generation`, whose
`relay` turns the raw events of the job's channel into an ordered, deduplicated
stream with timeouts. How the relay is answered (JSON or SSE, in which shape)
is the routes' business."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import redis
from flask import g

from api.admission import admit, job_queue
from api.constraints import check_constraint
from api.images import CanonicalImage, ImageLease, check_image_count
from api.metrics import ApiMetrics
from api.relay import EventHub, EventsMissed, Subscription
from api.routing import routed_queue
from api.schemas import RowMetadata
from api.state import app_state
from shared import defaults, events, jobs, keys, registry
from shared.payload import ChatMessage, GenerateRequest, GenerationJob
from shared.settings import ApiSettings

log = logging.getLogger(__name__)

LOST_EVENTS = "events of this request were lost while Redis was unavailable"


@dataclass(frozen=True)
class TokenRelayed:
    """New text for a row (each (row, seq) is relayed once, in order)."""

    row: int
    text: str


@dataclass(frozen=True)
class RowFinished:
    row: int
    done: events.DoneEvent


@dataclass(frozen=True)
class RequestFailed:
    """The request is over: a worker reported an error, or no event came in time."""

    message: str
    error_type: str
    status: int


@dataclass(frozen=True)
class StillWaiting:
    """A tick passed without an event (time for an SSE keep-alive)."""


RelayItem = TokenRelayed | RowFinished | RequestFailed | StillWaiting


@dataclass
class RowProgress:
    next_seq: int = 0
    parts: list[str] = field(default_factory=list)
    done: events.DoneEvent | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Generation:
    """A submitted request: its job, its inbox at the hub, the images it holds
    and the progress of its rows. `close` it when the request ends, however it ends."""

    def __init__(
        self,
        *,
        job: GenerationJob,
        subscription: Subscription,
        lease: ImageLease,
        connection: redis.Redis,
        settings: ApiSettings,
        metrics: ApiMetrics,
        submitted_at: float,
        reader_queue_key: str | None = None,
    ) -> None:
        self.job = job
        self._reader_queue_key = reader_queue_key  # where the job waits, if routed to one reader
        self.rows = [RowProgress() for _ in job.request.texts]
        self._subscription = subscription
        self._lease = lease
        self._connection = connection
        self._settings = settings
        self._metrics = metrics
        self._submitted_at = submitted_at  # time.monotonic() right after enqueueing
        self._first_event_at: float | None = None
        self._last_event_at: float | None = None
        self._first_token_at: float | None = None
        self._ended_unseen_by: float | None = None  # its job ended while the hub was away: wait until then
        self._worker_failed = False
        self._closed = False

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def consumer_group(self) -> str:
        return self.job.request.consumer_group

    @property
    def finished(self) -> bool:
        return all(row.done is not None for row in self.rows)

    def relay(self, *, tick: float | None = None) -> Iterator[RelayItem]:
        """Yield what the client should see until every row is done or the request
        fails. With `tick`, yield StillWaiting whenever `tick` seconds pass quietly."""
        while not self.finished:
            if self._last_event_at is None:
                limit = self._settings.first_event_timeout_seconds
                deadline = self._submitted_at + limit
                timeout_message = f"no worker started the request within {limit:g} s"
            else:
                limit = self._settings.next_event_timeout_seconds
                deadline = self._last_event_at + limit
                timeout_message = f"the worker sent nothing for {limit:g} s"
            if self._ended_unseen_by is not None and self._ended_unseen_by < deadline:
                deadline = self._ended_unseen_by
                timeout_message = f"{LOST_EVENTS}: the request's job ended meanwhile"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self._ended_unseen_by is not None and deadline == self._ended_unseen_by:
                    yield RequestFailed(timeout_message, "redis_unavailable", 503)
                else:
                    yield RequestFailed(timeout_message, "timeout", 504)
                return
            event = self._subscription.get(remaining if tick is None else min(remaining, tick))
            if event is None:
                if tick is not None and time.monotonic() < deadline:
                    yield StillWaiting()
                continue
            item = self._apply(event)
            if item is not None:
                yield item
                if isinstance(item, RequestFailed):
                    return

    def _apply(
        self, event: events.TokenEvent | events.DoneEvent | events.ErrorEvent | EventsMissed
    ) -> RelayItem | None:
        if isinstance(event, EventsMissed):
            return self._after_missed_events()
        now = time.monotonic()
        self._last_event_at = now
        if self._first_event_at is None:
            self._first_event_at = now
            self._metrics.queue_time.labels(self.consumer_group).observe(now - self._submitted_at)
        if isinstance(event, events.ErrorEvent):
            self._worker_failed = True
            status = event.status if 400 <= event.status <= 599 else 500
            return RequestFailed(event.error, event.error_type, status)
        if not 0 <= event.row < len(self.rows):
            log.warning("request %s: event for unknown row %d dropped", self.request_id, event.row)
            return None
        row = self.rows[event.row]
        if row.done is not None:
            return None  # a re-run repeating a finished row
        if isinstance(event, events.DoneEvent):
            if event.token_events is not None and event.token_events > row.next_seq:
                return self._lost_tokens(event.row, row.next_seq, event.token_events)
            row.done = event
            row.finished_at = now
            return RowFinished(event.row, event)
        if event.seq < row.next_seq:
            return None  # already relayed (a re-run after a worker crash)
        if event.seq > row.next_seq:
            return self._lost_tokens(event.row, row.next_seq, event.seq)
        row.next_seq = event.seq + 1
        row.parts.append(event.text)
        if row.first_token_at is None:
            row.first_token_at = now
        if self._first_token_at is None:
            self._first_token_at = now
            self._metrics.time_to_first_token.labels(self.consumer_group).observe(now - self._submitted_at)
        self._metrics.tokens_relayed.labels(self.consumer_group).inc()
        return TokenRelayed(event.row, event.text)

    def _lost_tokens(self, row: int, expected: int, seen: int) -> RequestFailed:
        """Token events `expected` up to `seen` of a row never came: the text would have a hole."""
        log.warning(
            "request %s row %d: token events %d to %d never came", self.request_id, row, expected, seen - 1
        )
        return RequestFailed(f"{LOST_EVENTS}: part of the answer is missing", "redis_unavailable", 503)

    def _after_missed_events(self) -> RequestFailed | None:
        """The hub was away from Redis and is back: go on waiting if the job can still send what
        is missing (it waits, runs, or was put back to run again after losing Redis itself);
        end the request if the job is gone, and give it a short grace if it has ended."""
        try:
            status = jobs.job_status(self._connection, self.request_id)
        except redis.RedisError as exc:
            return RequestFailed(f"{LOST_EVENTS}, and Redis is unavailable: {exc}", "redis_unavailable", 503)
        if status is None:
            return RequestFailed(f"{LOST_EVENTS}: the request's job is gone", "redis_unavailable", 503)
        if status in jobs.ENDED_STATUSES:
            self._ended_unseen_by = time.monotonic() + defaults.MISSED_EVENTS_GRACE_SECONDS
        return None

    def count_error(self, error_type: str) -> None:
        """Count an error told to the client inside a stream (JSON errors are counted by the app)."""
        self._metrics.errors.labels(error_type).inc()

    def texts(self) -> list[str]:
        return [row.text for row in self.rows]

    def row_metadata(self) -> list[RowMetadata]:
        """Token counts and finish reason from the worker, timings measured here."""

        def since_submit(moment: float | None) -> float | None:
            return None if moment is None else round((moment - self._submitted_at) * 1000, 3)

        return [
            RowMetadata(
                prompt_tokens=row.done.usage.prompt_tokens if row.done else None,
                cached_prompt_tokens=row.done.usage.cached_prompt_tokens if row.done else None,
                accepted_draft_tokens=row.done.usage.accepted_draft_tokens if row.done else None,
                completion_tokens=row.done.usage.completion_tokens if row.done else None,
                finish_reason=row.done.finish_reason if row.done else None,
                closed_early=row.done.closed_early if row.done else None,
                queue_time_ms=since_submit(self._first_event_at),
                time_to_first_token_ms=since_submit(row.first_token_at),
                total_time_ms=since_submit(row.finished_at),
            )
            for row in self.rows
        ]

    def cancel(self) -> None:
        """Take the job off its queue if no worker has it yet, and ask the worker
        that has it to drop the request's rows (best effort)."""
        try:
            with self._connection.pipeline(transaction=False) as pipe:
                pipe.set(keys.cancel_key(self.request_id), b"1", ex=defaults.CANCEL_TTL_SECONDS)
                pipe.lrem(job_queue(self._connection, self.consumer_group).key, 0, self.request_id)
                if self._reader_queue_key is not None:
                    pipe.lrem(self._reader_queue_key, 0, self.request_id)
                pipe.execute()
        except redis.exceptions.RedisError as exc:
            log.warning("request %s: could not set its cancel key: %s", self.request_id, exc)

    def close(self) -> None:
        """Leave the hub, cancel the job unless every row is done or the worker
        failed it, and release the request's images. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if not self.finished and not self._worker_failed:
            self.cancel()
        self._subscription.close()
        self._lease.release()


def start_generation(
    payload: GenerateRequest,
    *,
    image_count: int = 0,
    load_images: Callable[[], Sequence[CanonicalImage]] = list,
    messages: Sequence[ChatMessage] | None = None,
) -> Generation:
    """Check `payload` (constraint, image count, admission), load its images with
    `load_images` (only once admitted: fetching and decoding them is the costly
    part), store them and queue the job; `messages` is an OpenAI chat's conversation.
    An InvalidConstraint can only come from the constraint check, so a route family
    may answer it its own way."""
    state = app_state()
    check_constraint(payload)
    check_image_count(image_count)
    readers = admit(state.connection, payload, state.settings, with_images=image_count > 0)
    lease = ImageLease.take(state.connection, load_images())
    try:
        generation = _submit(
            state.connection,
            state.hub,
            payload,
            state.settings,
            state.metrics,
            lease=lease,
            messages=messages,
            readers=readers,
        )
    except BaseException:
        lease.release()
        raise
    g.job_id = generation.request_id  # for the request's log line
    return generation


def _submit(
    connection: redis.Redis,
    hub: EventHub,
    payload: GenerateRequest,
    settings: ApiSettings,
    metrics: ApiMetrics,
    *,
    lease: ImageLease,
    messages: Sequence[ChatMessage] | None = None,
    readers: Sequence[registry.ReaderInfo] = (),
) -> Generation:
    """Register the request's inbox (subscription confirmed), then enqueue its job, on the
    queue of the reader among `readers` it is routed to (api.routing) or its group's.
    The images `lease` holds in Redis are asked about by every row; the caller
    releases the lease if this raises, the Generation's `close` once it returns."""
    request_id = uuid.uuid4().hex
    seed = payload.seed if payload.seed is not None else secrets.randbits(63)
    job = GenerationJob(
        request_id=request_id,
        request=payload,
        seed=seed,
        enqueued_at=time.time(),
        image_ids=list(lease.image_ids),
        messages=list(messages) if messages is not None else None,
    )
    subscription = hub.subscribe(request_id)
    reader_queue = routed_queue(connection, job, readers) if settings.prefix_routing == "on" else None
    try:
        jobs.enqueue(job_queue(connection, payload.consumer_group), job, reader_queue)
    except BaseException:
        with contextlib.suppress(Exception):
            subscription.close()
        raise
    return Generation(
        job=job,
        subscription=subscription,
        lease=lease,
        connection=connection,
        settings=settings,
        metrics=metrics,
        submitted_at=time.monotonic(),
        reader_queue_key=reader_queue.key if reader_queue is not None else None,
    )
