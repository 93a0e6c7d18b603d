"""OpenAI's `model` on this server: GET /v1/models and /v1/models/{model}, and
`resolve_model`, which turns a request's model into a consumer group and LoRA
adapter. A model is a consumer group ("primary"), one of its adapters
("primary/alpha"), or an adapter alone ("alpha") when exactly one group has it."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from api.openai.errors import ModelNotFound, OpenAIError
from api.state import app_state
from shared import registry

blueprint = Blueprint("openai_models", __name__, url_prefix="/v1")


@blueprint.get("/models")
def list_models() -> Response:
    """One entry per consumer group, and one per LoRA adapter of a group ("group/lora_id")."""
    data = []
    for group, live in registry.all_live_readers(app_state().connection).items():
        data.append(_model_entry(group, live))
        data.extend(_adapter_entry(group, lora_id, live) for lora_id in _adapters(live))
    return jsonify({"object": "list", "data": data})


@blueprint.get("/models/<path:model>")
def retrieve_model(model: str) -> Response:
    group, lora_id = resolve_model(model)
    live = registry.live_readers(app_state().connection, group)
    return jsonify(_model_entry(group, live) if lora_id is None else _adapter_entry(group, lora_id, live))


def _model_entry(group: str, live: list[registry.ReaderInfo]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": group,
        "object": "model",
        "created": int(min((reader.started_at for reader in live), default=0)),
        "owned_by": "mmserve",
    }
    if live:
        entry["root"] = live[0].model_name
        lengths = [reader.context_length for reader in live if reader.context_length is not None]
        if lengths:
            entry["max_model_len"] = max(lengths)
    return entry


def _adapter_entry(group: str, lora_id: str, live: list[registry.ReaderInfo]) -> dict[str, Any]:
    return {**_model_entry(group, live), "id": f"{group}/{lora_id}", "root": lora_id, "parent": group}


def _adapters(live: list[registry.ReaderInfo]) -> list[str]:
    return sorted({lora_id for reader in live for lora_id in reader.loras.available})


def resolve_model(model: str) -> tuple[str, str | None]:
    """The consumer group and LoRA adapter `model` names, else the OpenAIError to answer."""
    connection = app_state().connection
    known = registry.known_groups(connection)
    if model in known:
        return model, None
    group, slash, lora_id = model.partition("/")
    if slash and group in known:
        if lora_id in _adapters(registry.live_readers(connection, group)):
            return group, lora_id
    elif not slash:
        owners = [g for g in sorted(known) if model in _adapters(registry.live_readers(connection, g))]
        if len(owners) == 1:
            return owners[0], model
        if owners:
            raise OpenAIError(
                f"the LoRA adapter '{model}' is served by several groups ({', '.join(owners)}): "
                f"name one, e.g. '{owners[0]}/{model}'",
                param="model",
            )
    available = ", ".join(sorted(known)) or "none yet"
    raise ModelNotFound(
        f"the model '{model}' does not exist: a model here is a consumer group ({available}), "
        "or one of its LoRA adapters as group/lora_id (GET /v1/models lists them)",
        param="model",
    )
