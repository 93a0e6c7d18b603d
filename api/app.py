"""The Flask app factory. One app serves the three ports (gunicorn binds all of
them to it); each blueprint answers on one port only (PORT_OF_BLUEPRINT), the
probes on every port, and a route asked on the wrong port is a 404.

Every request gets an id (the client's X-Request-ID when it is sane, else a
fresh one), echoed in the response and in the one log line written when the
response ends (streams included)."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid

import redis
from flask import Blueprint, Flask, Response, g, request
from werkzeug.exceptions import NotFound

from api import openapi, probes
from api.errors import PayloadTooLarge, Unauthorized, register_error_handlers
from api.management import local_workers, loras, readers, tokenizer
from api.metrics import ApiMetrics
from api.openai import models as openai_models
from api.openai import routes as openai_routes
from api.oversize_bodies import OVERSIZE_KEY, OversizeBodies
from api.playground import routes as playground
from api.relay import EventHub
from api.state import AppState, app_state, install
from api.takeoff import routes as takeoff_routes
from shared import connection as shared_connection
from shared.settings import ApiSettings

log = logging.getLogger("mmserve.api")

INFERENCE = "inference"
MANAGEMENT = "management"
OPENAI = "OpenAI"

BLUEPRINTS: tuple[tuple[Blueprint, str | None], ...] = (
    (takeoff_routes.blueprint, INFERENCE),
    (tokenizer.blueprint, INFERENCE),  # Takeoff answers its tokenizer routes on the inference port
    (openapi.blueprint, INFERENCE),
    (playground.blueprint, INFERENCE),
    (readers.blueprint, MANAGEMENT),
    (loras.blueprint, MANAGEMENT),
    (local_workers.blueprint, MANAGEMENT),
    (openai_routes.blueprint, OPENAI),
    (openai_models.blueprint, OPENAI),
    (probes.blueprint, None),
)
"""Every blueprint of the app and the port it answers on (None: every port)."""

PORT_OF_BLUEPRINT = {blueprint.name: port for blueprint, port in BLUEPRINTS if port is not None}

OPEN_ENDPOINTS = {"probes.healthz", *playground.OPEN_ENDPOINTS}
"""Endpoints that never ask for the API key."""

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def create_app(settings: ApiSettings, *, connection: redis.Redis | None = None) -> Flask:
    app = Flask("mmserve.api")
    # One byte above the limit: werkzeug truncates a chunked body at this size
    # without an error, and api.payloads answers 413 for anything longer than the limit.
    app.config["MAX_CONTENT_LENGTH"] = settings.body_size_limit_bytes + 1
    # Flask caps a multipart text field at 500 kB by default; json_data may be
    # as large as the body itself.
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.body_size_limit_bytes + 1
    app.json.sort_keys = False
    if connection is None:
        connection = shared_connection.connect(settings.redis_connection_url)
    hub = EventHub(connection)
    install(
        app, AppState(settings=settings, connection=connection, hub=hub, metrics=ApiMetrics(connection, hub))
    )

    for blueprint, _ in BLUEPRINTS:
        app.register_blueprint(blueprint)
    register_error_handlers(app)
    app.wsgi_app = OversizeBodies(
        app.wsgi_app, settings.body_size_limit_bytes, settings.discard_body_limit_bytes
    )
    app.before_request(_start_request)
    app.before_request(_refuse_oversize_body)
    app.before_request(_check_api_key)
    app.before_request(_check_port)
    app.after_request(_finish_request)
    return app


def _start_request() -> None:
    g.started_at = time.monotonic()
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def _refuse_oversize_body() -> None:
    """413 for a body whose Content-Length is over the limit (api.oversize_bodies has read and
    dropped it, so the client can read this answer)."""
    length = request.environ.get(OVERSIZE_KEY)
    if length is not None:
        limit = app_state().settings.body_size_limit_bytes
        raise PayloadTooLarge(f"the body is {length} bytes; the limit is {limit}")


def _check_api_key() -> None:
    expected = app_state().settings.api_key
    if not expected or request.endpoint in OPEN_ENDPOINTS:
        return
    authorization = request.headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    offered = token.strip() if scheme.lower() == "bearer" else request.headers.get("X-API-Key", "")
    if not hmac.compare_digest(offered.encode(), expected.encode()):
        raise Unauthorized("a valid API key is required (Authorization: Bearer <key> or X-API-Key: <key>)")


def _check_port() -> None:
    port_kind = PORT_OF_BLUEPRINT.get(request.blueprint or "")
    if port_kind is None:
        return
    settings = app_state().settings
    expected = {
        INFERENCE: settings.port,
        MANAGEMENT: settings.management_port,
        OPENAI: settings.openai_port,
    }[port_kind]
    if request.environ.get("SERVER_PORT") != str(expected):
        raise NotFound(f"{request.path} is served on the {port_kind} port ({expected})")


def _finish_request(response: Response) -> Response:
    request_id = g.get("request_id") or uuid.uuid4().hex
    response.headers["X-Request-ID"] = request_id
    if response.status_code == 401:
        response.headers.setdefault("WWW-Authenticate", "Bearer")
    metrics = app_state().metrics
    started_at = g.get("started_at", time.monotonic())
    route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
    method, path, status, job_id = request.method, request.path, response.status_code, g.get("job_id")

    def _log_when_done() -> None:
        # Runs when the response has been sent, so a stream's whole duration counts.
        duration = time.monotonic() - started_at
        metrics.observe_request(route, method, status, duration)
        log.info(
            "%s %s %d request_id=%s%s duration_ms=%.1f",
            method,
            path,
            status,
            request_id,
            f" job_id={job_id}" if job_id else "",
            duration * 1000,
        )

    response.call_on_close(_log_when_done)
    return response
