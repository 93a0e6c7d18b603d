"""Routes answered on both ports: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import redis
from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from api.state import app_state
from shared import readers

blueprint = Blueprint("probes", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


@blueprint.get("/readyz")
def readyz() -> Response:
    """200 when Redis answers and every known group has a live, ready worker."""
    state = app_state()
    reasons: list[str] = []
    ready_readers: dict[str, int] = {}
    try:
        state.connection.ping()
        groups = readers.all_live_readers(state.connection)
    except redis.exceptions.RedisError as exc:
        reasons.append(f"redis is unreachable: {exc}")
        groups = None
    if groups is not None:
        if not groups:
            reasons.append("no worker has registered")
        for group, live in groups.items():
            ready_readers[group] = sum(reader.ready for reader in live)
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
