"""Routes of the inference port: /generate, /generate_stream, and the routes
whose capability is not built yet (images, tokenizer access), which answer 501."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from api import sse
from api.admission import admit
from api.errors import ApiError, NotImplementedYet, UnknownReader
from api.generation import Generation, RequestFailed, StillWaiting, TokenRelayed, submit
from api.payloads import parse_generate_request
from api.state import app_state
from shared import readers
from shared.payload import GenerateRequest

log = logging.getLogger(__name__)

blueprint = Blueprint("inference", __name__)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _start_generation() -> tuple[GenerateRequest, Generation]:
    state = app_state()
    payload = parse_generate_request(request, state.settings.body_size_limit_bytes)
    admit(state.connection, payload, state.settings)
    generation = submit(state.connection, state.hub, payload, state.settings, state.metrics)
    g.job_id = generation.request_id
    return payload, generation


@blueprint.post("/generate")
def generate() -> Response:
    payload, generation = _start_generation()
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
    payload, generation = _start_generation()
    stream = EventStream(payload, generation, keepalive_seconds=app_state().settings.keepalive_seconds)
    return Response(stream, mimetype="text/event-stream", headers=STREAM_HEADERS)


class EventStream:
    """The SSE body of /generate_stream. The WSGI server calls `close` when the
    response ends, including when the client went away mid-stream: then the
    job is cancelled and the request leaves the hub (even if the body was
    never iterated, which a bare generator would not notice)."""

    def __init__(self, payload: GenerateRequest, generation: Generation, *, keepalive_seconds: float) -> None:
        self._payload = payload
        self._generation = generation
        self._keepalive_seconds = keepalive_seconds
        self._chunks = self._produce()

    def __iter__(self) -> Iterator[str]:
        return self._chunks

    def close(self) -> None:
        self._chunks.close()
        self._generation.close()

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
                    yield sse.error(item.message, item.error_type)
                    return
            if self._payload.return_metadata:
                yield sse.json_event(_metadata(self._payload, generation), name="metadata")
        except Exception:
            log.exception("request %s: stream failed", generation.request_id)
            yield sse.error("internal server error", "internal_error")
        finally:
            generation.close()


@blueprint.post("/image_generate")
@blueprint.post("/image_generate_stream")
def image_generate() -> Response:
    raise NotImplementedYet(
        "image inputs are not supported yet: /image_generate and /image_generate_stream "
        "will accept multipart image_data + json_data in a later version"
    )


@blueprint.post("/tokenize/<reader_id>")
@blueprint.post("/detokenize/<reader_id>")
@blueprint.post("/chat_template/<reader_id>")
def reader_tool(reader_id: str) -> Response:
    if readers.find_reader(app_state().connection, reader_id) is None:
        raise UnknownReader(f"no live reader '{reader_id}'")
    route = request.path.strip("/").split("/", 1)[0]
    raise NotImplementedYet(f"/{route} is not supported yet: workers do not answer tokenizer requests")
