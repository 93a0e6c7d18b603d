"""The per-process event hub: one Redis pub/sub connection (a pattern
subscription to every request's events channel) for all the requests this
process waits on, each given its own inbox. It starts lazily in each process
(gunicorn forks after import) and reconnects by itself.

`subscribe` returns only once the hub's subscription is confirmed, so a request
registered before its job is enqueued misses no event. Events published while
the hub is disconnected are lost for good: once it is subscribed again, every
request that was waiting gets `EventsMissed` in its inbox, ahead of any event
that came after, and decides what it lost (api.submission: a job that is gone, or
token numbers that skip, end it; a job re-run after the outage goes on). When the
hub stays away longer than its outage patience, the requests waiting end with a
`redis_unavailable` error instead."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pydantic
import redis

from shared import defaults, events, keys

log = logging.getLogger(__name__)

Event = events.TokenEvent | events.DoneEvent | events.ErrorEvent


@dataclass(frozen=True)
class EventsMissed:
    """Put in an inbox when the hub is subscribed again after losing Redis: events for the
    request may have been published meanwhile and lost."""


InboxItem = Event | EventsMissed

_WAKE_CHANNEL = keys.events_channel("event-hub-wake-up")
"""Published to by `EventHub.stop` so the listener thread notices at once; nobody registers it."""


class Subscription:
    """One request's inbox: the hub puts decoded events in, the request takes them out."""

    def __init__(self, request_id: str, inboxes: _Inboxes) -> None:
        self.request_id = request_id
        self.channel = keys.events_channel(request_id)
        self._inboxes = inboxes
        self._inbox: queue.Queue[InboxItem] = queue.Queue()

    def get(self, timeout: float) -> InboxItem | None:
        """The next event, or None when none arrived within `timeout` seconds."""
        try:
            if timeout <= 0:
                return self._inbox.get_nowait()
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop receiving this request's events. Safe to call more than once."""
        self._inboxes.remove(self)

    def deliver(self, event: InboxItem) -> None:
        self._inbox.put(event)

    def break_off(self, reason: str) -> None:
        """End the request with an error (the hub is stopping, or Redis is away for long)."""
        self._inbox.put(events.ErrorEvent(error=reason, error_type="redis_unavailable", status=503))


@dataclass
class _Inboxes:
    """The subscriptions of one running hub, by channel. Its lock is never held
    across I/O, so it cannot make greenlets wait on one another."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    by_channel: dict[str, Subscription] = field(default_factory=dict)

    def add(self, subscription: Subscription) -> None:
        with self.lock:
            self.by_channel[subscription.channel] = subscription

    def remove(self, subscription: Subscription) -> None:
        with self.lock:
            if self.by_channel.get(subscription.channel) is subscription:
                del self.by_channel[subscription.channel]

    def find(self, channel: str) -> Subscription | None:
        with self.lock:
            return self.by_channel.get(channel)

    def break_all(self, reason: str) -> None:
        for subscription in self.snapshot():
            subscription.break_off(reason)

    def snapshot(self) -> list[Subscription]:
        with self.lock:
            return list(self.by_channel.values())

    def tell_missed(self, subscriptions: Iterable[Subscription]) -> None:
        """Put EventsMissed in the inboxes of those of `subscriptions` still registered."""
        registered = set(self.snapshot())
        for subscription in subscriptions:
            if subscription in registered:
                subscription.deliver(EventsMissed())

    def __len__(self) -> int:
        with self.lock:
            return len(self.by_channel)


@dataclass
class _Runtime:
    """Everything that belongs to the hub running in one process. Built on first
    use inside that process, after gevent has patched threading."""

    pid: int
    inboxes: _Inboxes
    connected: threading.Event
    stopping: threading.Event
    thread: threading.Thread | None = None


class EventHub:
    """Routes every request's events from one pub/sub connection to per-request inboxes."""

    def __init__(
        self,
        connection: redis.Redis,
        *,
        subscribe_timeout_seconds: float = defaults.SUBSCRIBE_TIMEOUT_SECONDS,
        poll_seconds: float = 1.0,
        reconnect_delay_seconds: float = 0.1,
        max_reconnect_delay_seconds: float = 5.0,
        outage_patience_seconds: float = defaults.EVENT_HUB_OUTAGE_PATIENCE_SECONDS,
    ) -> None:
        self._connection = connection
        self._outage_patience = outage_patience_seconds
        self._subscribe_timeout = subscribe_timeout_seconds
        self._poll_seconds = poll_seconds
        self._reconnect_delay = reconnect_delay_seconds
        self._max_reconnect_delay = max_reconnect_delay_seconds
        self._start_lock = threading.Lock()  # never held across I/O (see _Inboxes)
        self._runtime: _Runtime | None = None

    # -- used by requests -------------------------------------------------

    def subscribe(self, request_id: str) -> Subscription:
        """Register a request's inbox; returns once the hub is subscribed.

        Raises redis.exceptions.ConnectionError when the hub cannot confirm
        its subscription within the subscribe timeout."""
        runtime = self._ensure_running()
        subscription = Subscription(request_id, runtime.inboxes)
        runtime.inboxes.add(subscription)
        if not runtime.connected.wait(self._subscribe_timeout):
            subscription.close()
            raise redis.exceptions.ConnectionError("the event relay is not subscribed to Redis")
        return subscription

    @property
    def started(self) -> bool:
        runtime = self._runtime
        return runtime is not None and runtime.pid == os.getpid()

    @property
    def connected(self) -> bool:
        return self.started and self._runtime.connected.is_set()

    @property
    def open_subscriptions(self) -> int:
        return len(self._runtime.inboxes) if self.started else 0

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the listener thread and end every waiting request (tests, shutdown)."""
        if not self.started:
            return
        runtime = self._runtime
        runtime.stopping.set()
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            self._connection.publish(_WAKE_CHANNEL, b"")
        if runtime.thread is not None:
            runtime.thread.join(timeout)
        runtime.inboxes.break_all("the API is shutting down")

    # -- the listener thread --------------------------------------------------

    def _ensure_running(self) -> _Runtime:
        with self._start_lock:
            runtime = self._runtime
            if runtime is None or runtime.pid != os.getpid():
                # First use in this process (or we are a forked child whose
                # parent's thread did not survive the fork).
                runtime = _Runtime(
                    pid=os.getpid(),
                    inboxes=_Inboxes(),
                    connected=threading.Event(),
                    stopping=threading.Event(),
                )
                self._runtime = runtime
            if runtime.thread is None or not runtime.thread.is_alive():
                runtime.stopping.clear()
                runtime.thread = threading.Thread(
                    target=self._run, args=(runtime,), name="mmserve-event-hub", daemon=True
                )
                runtime.thread.start()
            return runtime

    def _run(self, runtime: _Runtime) -> None:
        delay = self._reconnect_delay
        waiting_through_gap: set[Subscription] = set()  # waited while the hub was away
        away_since = time.monotonic()
        while not runtime.stopping.is_set():
            pubsub = self._connection.pubsub()
            try:
                pubsub.psubscribe(keys.EVENTS_PATTERN)
                self._await_confirmation(pubsub)
                runtime.connected.set()
                log.info("event hub subscribed to %s", keys.EVENTS_PATTERN)
                runtime.inboxes.tell_missed(waiting_through_gap)
                waiting_through_gap = set()
                delay = self._reconnect_delay
                self._relay(pubsub, runtime)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                log.warning("event hub connection failed: %s", exc)
            except Exception:
                log.exception("event hub failed")
            finally:
                runtime.connected.clear()
                with contextlib.suppress(Exception):
                    pubsub.close()
            if runtime.stopping.is_set():
                break
            if not waiting_through_gap:
                away_since = time.monotonic()
            waiting_through_gap.update(runtime.inboxes.snapshot())
            if waiting_through_gap and time.monotonic() - away_since > self._outage_patience:
                # a long outage: the requests that waited through it end now, not at their timeouts
                runtime.inboxes.break_all(f"Redis has been unavailable for over {self._outage_patience:g} s")
                waiting_through_gap = set()
            runtime.stopping.wait(delay)
            delay = min(delay * 2, self._max_reconnect_delay)

    def _await_confirmation(self, pubsub: redis.client.PubSub) -> None:
        deadline = time.monotonic() + self._subscribe_timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "psubscribe":
                return
        raise redis.exceptions.TimeoutError("Redis did not confirm the events subscription")

    def _relay(self, pubsub: redis.client.PubSub, runtime: _Runtime) -> None:
        while not runtime.stopping.is_set():
            message = pubsub.get_message(timeout=self._poll_seconds)
            if message is None:
                continue
            if message["type"] == "pmessage":
                self._route(message["channel"], message["data"], runtime.inboxes)
            elif message["type"] == "psubscribe":
                # redis-py reconnected inside the read and subscribed again:
                # whatever was published in between is gone.
                log.warning("event hub re-subscribed after a silent reconnect")
                runtime.inboxes.tell_missed(runtime.inboxes.snapshot())

    @staticmethod
    def _route(channel: bytes | str, data: bytes | str, inboxes: _Inboxes) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        subscription = inboxes.find(name)
        if subscription is None:
            return
        try:
            event = events.decode(data)
        except pydantic.ValidationError as exc:
            log.warning("dropping a malformed event on %s: %s", name, exc)
            return
        subscription.deliver(event)
