"""The live readers (registered worker processes) as the management port shows
them: /reader_groups, /status and /config/{reader_id}, in Takeoff's shapes. Also
how the other routes find one live reader and send it a reader call
(shared.reader_calls over shared.rpc)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel

from api.errors import UnknownReader
from api.state import app_state
from shared import reader_calls, registry, rpc

blueprint = Blueprint("readers", __name__)

SUMMARY_FIELDS = (
    "reader_id",
    "model_name",
    "model_type",
    "pids",
    "ready",
    "device",
    "dtype",
    "quantization",
    "fused_layers",
    "joint_prefill",
    "batch_invariant",
    "prefix_cache_bytes",
    "loras",
)


@blueprint.get("/reader_groups")
def reader_groups() -> Response:
    """`{group: [{reader_id, model_name, model_type, pids, ready, device, dtype, quantization,
    fused_layers, joint_prefill, batch_invariant, prefix_cache_bytes, loras}]}`, one entry per live reader."""
    groups = registry.all_live_readers(app_state().connection)
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
    for group, live in registry.all_live_readers(app_state().connection).items():
        for reader in live:
            description = reader.model_dump(mode="json", exclude={"consumer_group"})
            live_readers[reader.reader_id] = {"consumer_groups": [group], **description}
    return jsonify({"live_readers": live_readers})


@blueprint.get("/config/<reader_id>")
def config(reader_id: str) -> Response:
    return jsonify(live_reader(reader_id).model_dump(mode="json"))


def live_reader(reader_id: str) -> registry.ReaderInfo:
    """The live reader `reader_id`, or the 404 to answer."""
    reader = registry.find_reader(app_state().connection, reader_id)
    if reader is None:
        raise UnknownReader(f"no live reader '{reader_id}'")
    return reader


def call_reader(
    reader_id: str, tool: reader_calls.Tool, request: BaseModel, *, timeout: float | None = None
) -> dict[str, Any] | None:
    """Send one reader a call and wait for its answer (`{"ok": ..., "result" | "error": ...}`);
    None when it did not answer within `timeout` (shared.rpc's default when None)."""
    options = {} if timeout is None else {"timeout": timeout}
    return rpc.call(
        app_state().connection,
        reader_calls.inbox(reader_id),
        {"tool": tool, "request": request.model_dump(mode="json")},
        **options,
    )
