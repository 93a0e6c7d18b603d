"""The LoRA adapters of every live reader (GET /loras) and loading one into a
reader's memory now (POST /loras/{reader_id}), on the management port."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from api.errors import ApiError, GatewayTimeout, UnknownLora
from api.management.readers import call_reader, live_reader
from api.payloads import read_model_body
from api.state import app_state
from shared import defaults, reader_calls, registry

blueprint = Blueprint("loras", __name__)


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
    """Load an adapter into one reader's memory now (`{"lora_id": ...}`). A 504 does
    not mean it failed: the reader may still finish loading it."""
    reader = live_reader(reader_id)
    checked = read_model_body(
        request, app_state().settings.body_size_limit_bytes, reader_calls.LoadLoraRequest
    )
    if checked.lora_id not in reader.loras.available:
        raise UnknownLora(f"reader '{reader_id}' has no LoRA adapter '{checked.lora_id}'")
    timeout = defaults.LORA_LOAD_TIMEOUT_SECONDS
    answer = call_reader(reader_id, "load_lora", checked, timeout=timeout)
    if answer is None:
        raise GatewayTimeout(
            f"reader '{reader_id}' did not finish loading '{checked.lora_id}' in "
            f"{timeout:g} s; it may still: see GET /loras"
        )
    if not answer.get("ok"):
        raise ApiError(
            str(answer.get("error")),
            error_type=str(answer.get("error_type", "lora_error")),
            status=int(answer.get("status", 500)),
        )
    return jsonify({"reader_id": reader_id, **answer["result"]})
