"""Sends a decode step's events to Redis and learns which requests were
cancelled, in one pipelined round-trip per step."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import redis

from shared import events, keys
from shared.events import DoneEvent, ErrorEvent, TokenEvent

Event = TokenEvent | DoneEvent | ErrorEvent


class EventPublisher:
    def __init__(self, connection: redis.Redis):
        self._connection = connection

    @property
    def connection(self) -> redis.Redis:
        return self._connection

    def publish(self, batch: Sequence[tuple[str, Event]], watch_cancelled: Iterable[str] = ()) -> set[str]:
        """Publish (request_id, event) pairs in order; return which of
        `watch_cancelled` request ids have their cancel key set."""
        watched = list(watch_cancelled)
        if not batch and not watched:
            return set()
        with self._connection.pipeline(transaction=False) as pipe:
            for request_id, event in batch:
                pipe.publish(keys.events_channel(request_id), events.encode(event))
            for request_id in watched:
                pipe.exists(keys.cancel_key(request_id))
            replies = pipe.execute()
        flags = replies[len(batch) :]
        return {request_id for request_id, flag in zip(watched, flags, strict=True) if flag}
