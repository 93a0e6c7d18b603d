"""The playground's routes, on the inference port: GET / (the page), GET /playground/<file>
(its scripts and styles) and GET /playground/info, what the page shows about the
server: every consumer group with its live readers (model, type, device, dtype, LoRA
adapters) and its queue depth, and the constrained-decoding backends.

/playground/info is the read-only part of the management port's /reader_groups the page
needs, answered on the inference port so the page stays on one origin; it asks for the API
key as every route does. The page and its files are open: the page asks for the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, send_from_directory

from api.state import app_state
from shared import constraints, jobs, registry

STATIC_DIR = Path(__file__).with_name("static")

blueprint = Blueprint(
    "playground", __name__, static_folder=str(STATIC_DIR), static_url_path="/playground/static"
)

OPEN_ENDPOINTS = frozenset({"playground.page", "playground.static"})
"""The page and its files load without the API key (the page then asks for it)."""

READER_FIELDS = frozenset(
    {
        "reader_id",
        "model_name",
        "model_type",
        "ready",
        "hostname",
        "device",
        "dtype",
        "quantization",
        "threads",
        "max_batch_size",
        "context_length",
        "has_chat_template",
        "loras",
    }
)


@blueprint.get("/")
def page() -> Response:
    response = send_from_directory(STATIC_DIR, "index.html", max_age=0)
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'"
    )
    return response


@blueprint.get("/playground/info")
def info() -> Response:
    """`{"groups": {group: {"queue_depth": n, "readers": [...]}}, "constrained_decoding_backends":
    [...], "default_backend": "..."}`."""
    connection = app_state().connection
    groups: dict[str, Any] = {}
    for group, live in sorted(registry.all_live_readers(connection).items()):
        groups[group] = {
            "queue_depth": jobs.waiting(connection, group),
            "readers": [reader.model_dump(mode="json", include=set(READER_FIELDS)) for reader in live],
        }
    return jsonify(
        groups=groups,
        constrained_decoding_backends=list(constraints.BACKENDS),
        default_backend=constraints.DEFAULT_BACKEND,
    )
