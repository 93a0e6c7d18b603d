"""Routes answered on both ports: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import redis
from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from api.state import app_state
from shared import defaults, registry

blueprint = Blueprint("probes", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@blueprint.get("/readyz")
def readyz() -> Response:
    """200 when Redis answers and every group that had a worker in the last
    IDLE_GROUP_SECONDS has a live, ready one (with --scale-from-zero on, Redis
    answering is enough: requests wait for workers)."""
    state = app_state()
    waits_for_workers = state.settings.scale_from_zero == "on"
    reasons: list[str] = []
    ready_readers: dict[str, int] = {}
    try:
        state.connection.ping()
        groups = registry.all_live_readers(state.connection)
        recent = registry.groups_seen_since(state.connection, defaults.IDLE_GROUP_SECONDS)
    except redis.exceptions.RedisError as exc:
        reasons.append(f"redis is unreachable: {exc}")
        groups = None
    if groups is not None:
        if not groups and not waits_for_workers:
            reasons.append("no worker has registered")
        for group, live in groups.items():
            if not live and group not in recent:
                continue  # idle: no worker for a long time (its requests get 503, or wait for one)
            ready_readers[group] = sum(reader.ready for reader in live)
            if waits_for_workers:
                continue
            if not live:
                reasons.append(f"consumer_group '{group}' has no live worker")
            elif not ready_readers[group]:
                reasons.append(f"the workers of consumer_group '{group}' are still loading their model")
        if state.hub.started and not state.hub.connected:
            reasons.append("the event relay is reconnecting to Redis")
    response = jsonify(ready=not reasons, reasons=reasons, ready_readers=ready_readers)
    response.status_code = 503 if reasons else 200
    return response


@blueprint.get("/metrics")
def metrics() -> Response:
    return Response(app_state().metrics.render(), mimetype=None, content_type=CONTENT_TYPE_LATEST)
