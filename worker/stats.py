"""Counting what a worker does (tokens, decode steps, rows per step, requests),
cheaply, on the decode thread; worker.heartbeat publishes a snapshot."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from shared.registry import BATCH_ROWS_BUCKETS, DrafterStats, WorkerStats

if TYPE_CHECKING:
    from worker.engine.prefix_cache import PrefixCache
    from worker.engine.speculation.drafting import DraftCounters


class StatsRecorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = WorkerStats()
        self._buckets = [0] * (len(BATCH_ROWS_BUCKETS) + 1)

    def record_step(self, rows: int, tokens: int, seconds: float) -> None:
        with self._lock:
            stats = self._stats
            stats.decode_steps += 1
            stats.decode_seconds += seconds
            stats.tokens_generated += tokens
            stats.rows_sum += rows
            index = next((i for i, bound in enumerate(BATCH_ROWS_BUCKETS) if rows <= bound), -1)
            self._buckets[index] += 1

    def record_request(self, failed: bool) -> None:
        with self._lock:
            if failed:
                self._stats.requests_failed += 1
            else:
                self._stats.requests_finished += 1

    def snapshot(
        self, prefix_cache: PrefixCache | None = None, drafts: Mapping[str, DraftCounters] | None = None
    ) -> WorkerStats:
        """A copy, with rows_per_step as Prometheus-style cumulative bucket counts, and
        the prefix cache's and each drafter's counters (read without a lock: a count may lag
        by a step)."""
        update: dict[str, object] = {}
        if drafts is not None:
            update["drafters"] = {
                drafter: DrafterStats(proposed=counts.drafted, accepted=counts.kept, checks=counts.checks)
                for drafter, counts in drafts.items()
            }
        if prefix_cache is not None:
            counters = prefix_cache.counters
            update.update(
                prefix_cache_hit_tokens=counters.hit_tokens,
                prefix_cache_missed_tokens=counters.missed_tokens,
                prefix_cache_bytes=prefix_cache.bytes,
                prefix_cache_evicted_blocks=counters.evicted_blocks,
            )
        with self._lock:
            cumulative, total = {}, 0
            for bound, count in zip((*map(str, BATCH_ROWS_BUCKETS), "+Inf"), self._buckets, strict=True):
                total += count
                cumulative[bound] = total
            return self._stats.model_copy(update={**update, "rows_per_step": cumulative})
