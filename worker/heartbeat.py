"""Keeps this worker's entry in the reader registry (shared.registry) alive from a
background thread, so that a long decode step never makes a live worker look dead."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis

from shared import defaults, registry
from shared.registry import ReaderInfo

log = logging.getLogger(__name__)


class Heartbeat:
    """Registers this worker as a reader every few seconds until stopped, then deregisters it."""

    def __init__(
        self, connection: redis.Redis, info: ReaderInfo, interval: float = defaults.READER_HEARTBEAT_SECONDS
    ):
        self._connection = connection
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info = info
        # What each beat reads afresh (the worker's counters, its adapters): ReaderInfo fields.
        self.refresh: Callable[[], dict[str, Any]] | None = None
        # What each beat does besides (e.g. requeueing the jobs of dead readers' queues).
        self.chores: list[Callable[[], object]] = []

    def update(self, **changes) -> None:
        """Change what the registry says (e.g. ready=True) and publish it now."""
        self.info = self.info.model_copy(update=changes)
        self._beat()

    def start(self) -> None:
        self._beat()
        self._thread = threading.Thread(target=self._run, name="registry-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._interval + 1)
        try:
            registry.deregister(self._connection, self.info)
        except redis.RedisError as exc:
            log.warning("could not deregister reader %s: %s", self.info.reader_id, exc)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._beat()

    def _beat(self) -> None:
        if self.refresh is not None:
            self.info = self.info.model_copy(update=self.refresh())
        try:
            registry.register(self._connection, self.info)
        except redis.RedisError as exc:
            log.warning("registry heartbeat failed (will retry): %s", exc)
        for chore in self.chores:
            try:
                chore()
            except redis.RedisError as exc:
                log.warning("heartbeat chore failed (will retry): %s", exc)
