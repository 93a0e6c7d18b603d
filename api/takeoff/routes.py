"""Routes of the inference port: /generate, /generate_stream, their image
twins /image_generate and /image_generate_stream (multipart: image_data +
json_data, see api.takeoff.images), and the routes whose capability is not built yet
(tokenizer access), which answer 501."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from pydantic import ValidationError

from api import sse
from api.admission import admit
from api.errors import ApiError, InvalidPayload, UnknownReader
from api.state import app_state
from api.submission import Generation, RequestFailed, StillWaiting, TokenRelayed, submit
from api.takeoff import images
from api.takeoff.constraints import check_constraint
from api.takeoff.payloads import describe_validation_error, parse_generate_request, read_json_body
from shared import reader_calls, registry, rpc
from shared.payload import GenerateRequest

log = logging.getLogger(__name__)

blueprint = Blueprint("inference", __name__)

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _start_generation(*, multipart: bool = False) -> tuple[GenerateRequest, Generation, images.ImageLease]:
    """Check the request, store its images, queue its job. The caller releases
    the returned lease when the request ends."""
    state = app_state()
    settings = state.settings
    if multipart:
        upload = images.read_upload(request, settings)
        payload, uploaded = upload.payload, upload.images
    else:
        payload, uploaded = parse_generate_request(request, settings.body_size_limit_bytes), []
    check_constraint(payload)
    image_paths = payload.image_paths or []
    images.check_image_count(len(uploaded) + len(image_paths))
    admit(state.connection, payload, settings, with_images=bool(uploaded or image_paths))
    request_images = [*uploaded, *images.load_image_paths(image_paths, settings)]
    lease = images.ImageLease.take(state.connection, request_images)
    try:
        generation = submit(
            state.connection, state.hub, payload, settings, state.metrics, image_ids=lease.image_ids
        )
    except BaseException:
        lease.release()
        raise
    g.job_id = generation.request_id
    return payload, generation, lease


@blueprint.post("/generate")
def generate() -> Response:
    return _answer(multipart=False)


@blueprint.post("/image_generate")
def image_generate() -> Response:
    return _answer(multipart=True)


def _answer(*, multipart: bool) -> Response:
    payload, generation, lease = _start_generation(multipart=multipart)
    try:
        for item in generation.relay():
            if isinstance(item, RequestFailed):
                raise ApiError(item.message, status=item.status, error_type=item.error_type)
    finally:
        generation.close()
        lease.release()
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
    payload, generation, lease = _start_generation(multipart=multipart)
    stream = EventStream(
        payload, generation, keepalive_seconds=app_state().settings.keepalive_seconds, lease=lease
    )
    return Response(stream, mimetype="text/event-stream", headers=STREAM_HEADERS)


class EventStream:
    """The SSE body of /generate_stream. The WSGI server calls `close` when the
    response ends, including when the client went away mid-stream: then the
    job is cancelled and the request leaves the hub (even if the body was
    never iterated, which a bare generator would not notice)."""

    def __init__(
        self,
        payload: GenerateRequest,
        generation: Generation,
        *,
        keepalive_seconds: float,
        lease: images.ImageLease | None = None,
    ) -> None:
        self._payload = payload
        self._generation = generation
        self._keepalive_seconds = keepalive_seconds
        self._lease = lease  # released when the response ends
        self._chunks = self._produce()

    def __iter__(self) -> Iterator[str]:
        return self._chunks

    def close(self) -> None:
        self._chunks.close()
        self._generation.close()
        if self._lease is not None:
            self._lease.release()

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
            if self._lease is not None:
                self._lease.release()


@blueprint.post("/tokenize/<reader_id>")
@blueprint.post("/detokenize/<reader_id>")
@blueprint.post("/chat_template/<reader_id>")
def reader_tool(reader_id: str) -> Response:
    """Takeoff's tokenizer routes, answered by that reader's own tokenizer."""
    state = app_state()
    if registry.find_reader(state.connection, reader_id) is None:
        raise UnknownReader(f"no live reader '{reader_id}'")
    tool = request.path.strip("/").split("/", 1)[0]
    body = read_json_body(request, state.settings.body_size_limit_bytes)
    try:
        checked = reader_calls.REQUESTS[tool].model_validate(body)
    except ValidationError as exc:
        raise InvalidPayload(describe_validation_error(exc)) from None
    answer = rpc.call(
        state.connection,
        reader_calls.inbox(reader_id),
        {"tool": tool, "request": checked.model_dump(mode="json")},
    )
    if answer is None:
        raise ApiError(
            f"reader '{reader_id}' did not answer in time", error_type="reader_unavailable", status=503
        )
    if not answer.get("ok"):
        raise ApiError(
            str(answer.get("error")), error_type="tokenizer_error", status=int(answer.get("status", 400))
        )
    return jsonify(answer["result"])
