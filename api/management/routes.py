"""Routes of the management port, in Takeoff's shapes: the live readers
(worker processes) by group, their status, and one reader's configuration;
the LoRA adapters of every reader, and loading one now; starting and stopping
local workers under `mmserve serve`."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError

from api.errors import (
    ApiError,
    GatewayTimeout,
    InvalidPayload,
    NotImplementedYet,
    UnknownLora,
    UnknownReader,
)
from api.state import app_state
from api.takeoff.payloads import describe_validation_error, read_json_body
from shared import defaults, reader_calls, registry, rpc, supervision

blueprint = Blueprint("management", __name__)

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
    "loras",
)


@blueprint.get("/reader_groups")
def reader_groups() -> Response:
    """`{group: [{reader_id, model_name, model_type, pids, ready, device, dtype, quantization,
    fused_layers, joint_prefill, loras}]}`, one entry per live reader."""
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
    reader = registry.find_reader(app_state().connection, reader_id)
    if reader is None:
        raise UnknownReader(f"no live reader '{reader_id}'")
    return jsonify(reader.model_dump(mode="json"))


@blueprint.get("/loras")
def loras() -> Response:
    """`{group: {reader_id: {"available": [...], "loaded": [...], "max_loaded": n}}}`."""
    groups = registry.all_live_readers(app_state().connection)
    return jsonify(
        {
            group: {reader.reader_id: reader.loras.model_dump(mode="json") for reader in live}
            for group, live in groups.items()
        }
    )


@blueprint.post("/loras/<reader_id>")
def load_lora(reader_id: str) -> Response:
    """Load an adapter into one reader's memory now (`{"lora_id": ...}`)."""
    state = app_state()
    reader = registry.find_reader(state.connection, reader_id)
    if reader is None:
        raise UnknownReader(f"no live reader '{reader_id}'")
    body = read_json_body(request, state.settings.body_size_limit_bytes)
    try:
        checked = reader_calls.LoadLoraRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidPayload(describe_validation_error(exc)) from None
    if checked.lora_id not in reader.loras.available:
        raise UnknownLora(f"reader '{reader_id}' has no LoRA adapter '{checked.lora_id}'")
    answer = rpc.call(
        state.connection,
        reader_calls.inbox(reader_id),
        {"tool": "load_lora", "request": checked.model_dump(mode="json")},
        timeout=defaults.LORA_LOAD_TIMEOUT_SECONDS,
    )
    if answer is None:
        raise GatewayTimeout(
            f"reader '{reader_id}' did not finish loading '{checked.lora_id}' in "
            f"{defaults.LORA_LOAD_TIMEOUT_SECONDS:g} s; it may still: see GET /loras"
        )
    if not answer.get("ok"):
        raise ApiError(
            str(answer.get("error")),
            error_type=str(answer.get("error_type", "lora_error")),
            status=int(answer.get("status", 500)),
        )
    return jsonify({"reader_id": reader_id, **answer["result"]})


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


@blueprint.post("/reader")
def create_reader() -> tuple[Response, int]:
    """Start a local worker process (only under `mmserve serve`)."""
    _supervisor_id()
    body = read_json_body(request, app_state().settings.body_size_limit_bytes)
    try:
        spec = supervision.ReaderSpec.model_validate(body)
    except ValidationError as exc:
        raise InvalidPayload(describe_validation_error(exc)) from None
    reply = _ask_supervisor(supervision.Command(action="start", spec=spec))
    return jsonify(
        {
            "reader_id": reply.reader_id,
            "pid": reply.pid,
            "consumer_group": spec.consumer_group,
            "ready": False,
        }
    ), 201


@blueprint.delete("/reader/<reader_id>")
def delete_reader(reader_id: str) -> Response:
    """Stop a local worker process started by this `mmserve serve` (it finishes its batch first)."""
    _supervisor_id()
    if registry.find_reader(app_state().connection, reader_id) is None:
        raise UnknownReader(f"no live reader '{reader_id}'")
    reply = _ask_supervisor(supervision.Command(action="stop", reader_id=reader_id))
    return jsonify({"reader_id": reply.reader_id, "stopping": True})
