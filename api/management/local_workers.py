"""Starting and stopping local worker processes from the management port
(POST /reader, DELETE /reader/{reader_id}). Only `mmserve serve` runs a
supervisor that can do it, asked over shared.supervision; an API started on its
own (`mmserve api`) answers 501."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from api.errors import ApiError, NotImplementedYet
from api.management.readers import live_reader
from api.payloads import read_model_body
from api.state import app_state
from shared import supervision

blueprint = Blueprint("local_workers", __name__)


@blueprint.post("/reader")
def create_reader() -> tuple[Response, int]:
    """Start a local worker process; it registers as a reader once its model is loaded. The body is
    Takeoff's reader config (shared.supervision.ReaderSpec); the answer names the keys it ignored."""
    _supervisor_id()
    spec = read_model_body(request, app_state().settings.body_size_limit_bytes, supervision.ReaderSpec)
    reply = _ask_supervisor(supervision.Command(action="start", spec=spec))
    return jsonify(
        {
            "reader_id": reply.reader_id,
            "pid": reply.pid,
            "consumer_group": spec.consumer_group,
            "ready": False,
            "ignored": spec.ignored(),  # Takeoff keys that mean nothing here
        }
    ), 201


@blueprint.delete("/reader/<reader_id>")
def delete_reader(reader_id: str) -> Response:
    """Stop a local worker process started by this `mmserve serve` (it finishes its batch first)."""
    _supervisor_id()
    live_reader(reader_id)
    reply = _ask_supervisor(supervision.Command(action="stop", reader_id=reader_id))
    return jsonify({"reader_id": reply.reader_id, "stopping": True})


def _supervisor_id() -> str:
    supervisor_id = app_state().settings.supervisor_id
    if supervisor_id is None:
        raise NotImplementedYet(
            "this API was started on its own (`mmserve api`), so it cannot start or stop workers: "
            "run `mmserve worker` on any machine that reaches Redis, or use `mmserve serve`"
        )
    return supervisor_id


def _ask_supervisor(command: supervision.Command) -> supervision.Reply:
    reply = supervision.send(app_state().connection, _supervisor_id(), command)
    if reply is None:
        raise ApiError(
            "`mmserve serve` did not answer in time", error_type="supervisor_unavailable", status=503
        )
    if not reply.ok:
        raise ApiError(reply.error or "refused", error_type="reader_command_failed", status=reply.status)
    return reply
