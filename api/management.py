"""Routes of the management port, in Takeoff's shapes: the live readers
(worker processes) by group, their status, and one reader's configuration."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from api.errors import UnknownReader
from api.state import app_state
from shared import readers

blueprint = Blueprint("management", __name__)

SUMMARY_FIELDS = ("reader_id", "model_name", "model_type", "pids", "ready")


@blueprint.get("/reader_groups")
def reader_groups() -> Response:
    """`{group: [{reader_id, model_name, model_type, pids, ready}, ...]}`, one entry per live reader."""
    groups = readers.all_live_readers(app_state().connection)
    return jsonify(
        {
            group: [reader.model_dump(mode="json", include=set(SUMMARY_FIELDS)) for reader in live]
            for group, live in groups.items()
        }
    )


@blueprint.get("/status")
def status() -> Response:
    """`{"live_readers": {reader_id: {"consumer_groups": [group], ...the reader's description}}}`."""
    live_readers = {}
    for group, live in readers.all_live_readers(app_state().connection).items():
        for reader in live:
            description = reader.model_dump(mode="json", exclude={"consumer_group"})
            live_readers[reader.reader_id] = {"consumer_groups": [group], **description}
    return jsonify({"live_readers": live_readers})


@blueprint.get("/config/<reader_id>")
def config(reader_id: str) -> Response:
    reader = readers.find_reader(app_state().connection, reader_id)
    if reader is None:
        raise UnknownReader(f"no live reader '{reader_id}'")
    return jsonify(reader.model_dump(mode="json"))
