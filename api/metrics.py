"""The API's Prometheus metrics, in a registry of its own per app (tests build
many apps in one process). Request counters and histograms are updated as
requests end; queue depth, live readers and the event hub's state are read
when /metrics is scraped.

Each gunicorn worker process keeps its own registry, so a scrape sees the
process that answered it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.admission import job_queue
from shared import readers

if TYPE_CHECKING:
    from api.relay import EventHub

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class RedisStateCollector(Collector):
    """Gauges read from Redis (and the hub) at scrape time."""

    def __init__(self, connection: redis.Redis, hub: EventHub) -> None:
        self._connection = connection
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        redis_up = GaugeMetricFamily("mmserve_redis_up", "1 when Redis answered this scrape.")
        queue_depth = GaugeMetricFamily(
            "mmserve_queue_depth", "Jobs waiting in a consumer group's queue.", labels=["consumer_group"]
        )
        live = GaugeMetricFamily(
            "mmserve_live_readers", "Workers of a group with a live heartbeat.", labels=["consumer_group"]
        )
        ready = GaugeMetricFamily(
            "mmserve_ready_readers",
            "Live workers of a group that have loaded their model.",
            labels=["consumer_group"],
        )
        try:
            for group, group_readers in readers.all_live_readers(self._connection).items():
                depth = job_queue(self._connection, group).count
                queue_depth.add_metric([group], depth)
                live.add_metric([group], len(group_readers))
                ready.add_metric([group], sum(reader.ready for reader in group_readers))
            redis_up.add_metric([], 1)
        except redis.exceptions.RedisError as exc:
            log.warning("metrics scrape could not read redis: %s", exc)
            redis_up.add_metric([], 0)
        yield redis_up
        yield queue_depth
        yield live
        yield ready
        yield GaugeMetricFamily(
            "mmserve_api_event_hub_connected",
            "1 while this process's event hub is subscribed to Redis.",
            value=1 if self._hub.connected else 0,
        )
        yield GaugeMetricFamily(
            "mmserve_api_open_relays",
            "Requests of this process waiting for worker events.",
            value=self._hub.open_subscriptions,
        )


class ApiMetrics:
    def __init__(self, connection: redis.Redis, hub: EventHub) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mmserve_api_requests",
            "HTTP requests answered, by route and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "mmserve_api_request_duration_seconds",
            "Time from request to the end of the response (streams included).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "mmserve_api_time_to_first_token_seconds",
            "Time from enqueueing a job to relaying its first token.",
            ["consumer_group"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens_relayed = Counter(
            "mmserve_api_tokens_relayed",
            "Token events relayed to clients (duplicates from re-runs excluded).",
            ["consumer_group"],
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "mmserve_api_queue_time_seconds",
            "Time from enqueueing a job to the first event from a worker (time in queue).",
            ["consumer_group"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "mmserve_api_errors",
            "Errors answered to clients (JSON bodies and error events in streams), by error_type.",
            ["error_type"],
            registry=self.registry,
        )
        self.registry.register(RedisStateCollector(connection, hub))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
