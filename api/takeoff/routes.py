"""Takeoff's generation routes on the inference port: /generate and
/generate_stream take a JSON payload, their image twins /image_generate and
/image_generate_stream a multipart body (image_data + json_data, see
api.images). The tokenizer routes, also on this port, are in api.management.tokenizer."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request

from api import sse
from api.errors import ENCODERS_NOT_YET, ApiError, NotImplementedYet
from api.payloads import parse_generate_request
from api.state import app_state
from api.submission import Generation, RequestFailed, StillWaiting, TokenRelayed, start_generation
from api.takeoff import uploads
from shared.payload import GenerateRequest

log = logging.getLogger(__name__)

blueprint = Blueprint("takeoff", __name__)


@blueprint.post("/embed")
@blueprint.post("/classify")
def encoder_routes() -> Response:
    """Takeoff's embedding and classification routes: 501 until mmserve serves encoders."""
    raise NotImplementedYet(ENCODERS_NOT_YET)


def _start(*, multipart: bool) -> tuple[GenerateRequest, Generation]:
    """Read the payload (and uploaded images) from the body, then start its generation."""
    settings = app_state().settings
    if multipart:
        upload = uploads.read_upload(request, settings)
        payload, uploaded = upload.payload, upload.images
    else:
        payload, uploaded = parse_generate_request(request, settings.body_size_limit_bytes), []
    image_paths = payload.image_paths or []
    generation = start_generation(
        payload,
        image_count=len(uploaded) + len(image_paths),
        load_images=lambda: [*uploaded, *uploads.load_image_paths(image_paths, settings)],
    )
    return payload, generation


@blueprint.post("/generate")
def generate() -> Response:
    return _answer(multipart=False)


@blueprint.post("/image_generate")
def image_generate() -> Response:
    return _answer(multipart=True)


def _answer(*, multipart: bool) -> Response:
    payload, generation = _start(multipart=multipart)
    try:
        for item in generation.relay():
            if isinstance(item, RequestFailed):
                raise ApiError(item.message, status=item.status, error_type=item.error_type)
    finally:
        generation.close()
    return jsonify(answer_body(payload, generation))


def answer_body(payload: GenerateRequest, generation: Generation) -> dict[str, Any]:
    """`{"text": ...}` shaped like the payload's text, plus metadata when asked
    (the shape api.schemas.GenerateResponse documents)."""
    texts = generation.texts()
    body: dict[str, Any] = {"text": texts if payload.is_batch else texts[0]}
    if payload.return_metadata:
        body["metadata"] = _metadata(payload, generation)
    return body


def _metadata(payload: GenerateRequest, generation: Generation) -> Any:
    rows = [row.model_dump(mode="json") for row in generation.row_metadata()]
    return rows if payload.is_batch else rows[0]


@blueprint.post("/generate_stream")
def generate_stream() -> Response:
    return _stream(multipart=False)


@blueprint.post("/image_generate_stream")
def image_generate_stream() -> Response:
    return _stream(multipart=True)


def _stream(*, multipart: bool) -> Response:
    payload, generation = _start(multipart=multipart)
    stream = EventStream(payload, generation, keepalive_seconds=app_state().settings.keepalive_seconds)
    return Response(stream, mimetype="text/event-stream", headers=sse.HEADERS)


class EventStream(sse.StreamBody):
    """The SSE body of /generate_stream."""

    def __init__(self, payload: GenerateRequest, generation: Generation, *, keepalive_seconds: float) -> None:
        self._payload = payload
        self._generation = generation
        self._keepalive_seconds = keepalive_seconds
        super().__init__(self._produce(), generation.close)

    def _produce(self) -> Iterator[str]:
        generation = self._generation
        try:
            for item in generation.relay(tick=self._keepalive_seconds):
                if isinstance(item, TokenRelayed):
                    chunk = (
                        sse.batch_token(item.text, item.row)
                        if self._payload.is_batch
                        else sse.token(item.text)
                    )
                    if chunk:
                        yield chunk
                elif isinstance(item, StillWaiting):
                    yield sse.KEEPALIVE
                elif isinstance(item, RequestFailed):
                    generation.count_error(item.error_type)
                    yield sse.error(item.message, item.error_type)
                    return
            if self._payload.return_metadata:
                yield sse.json_event(_metadata(self._payload, generation), name="metadata")
        except Exception:
            log.exception("request %s: stream failed", generation.request_id)
            yield sse.error("internal server error", "internal_error")
        finally:
            generation.close()
