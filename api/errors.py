"""The API's errors and the handlers that turn every exception into the JSON
error body `{"error": "...", "error_type": "..."}` (on the OpenAI port,
OpenAI's shape instead: see api.openai.errors).

Routes raise an `ApiError` subclass; werkzeug's HTTP exceptions (unknown route,
wrong method, body over MAX_CONTENT_LENGTH) and Redis connection failures are
mapped here too, and anything unexpected becomes a logged 500."""

from __future__ import annotations

import contextlib
import logging
import re

import redis
from flask import Flask, Response, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from shared import defaults

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client as it is: status, error_type, message."""

    status: int = 500
    error_type: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        self.retry_after = retry_after


class InvalidRequest(ApiError):
    """The body cannot be read as JSON at all."""

    status = 400
    error_type = "invalid_request"


class InvalidImage(ApiError):
    """An image part or image path that cannot be used (not an image, truncated,
    outside --image-dir, remote when remote images are off...)."""

    status = 400
    error_type = "invalid_image"


class ImagesNotAccepted(ApiError):
    """The group's model is text-only."""

    status = 400
    error_type = "model_does_not_accept_images"


class Unauthorized(ApiError):
    status = 401
    error_type = "unauthorized"


class InvalidConstraint(ApiError):
    """regex_string / json_schema / constrained_decoding_backend that cannot be
    enforced exactly (invalid, or using what the chosen backend would ignore)."""

    status = 400
    error_type = "invalid_constraint"


class UnknownConsumerGroup(ApiError):
    status = 404
    error_type = "unknown_consumer_group"


class UnknownLora(ApiError):
    status = 404
    error_type = "unknown_lora"


class UnknownReader(ApiError):
    status = 404
    error_type = "unknown_reader"


class PayloadTooLarge(ApiError):
    status = 413
    error_type = "payload_too_large"


class ImageTooLarge(PayloadTooLarge):
    error_type = "image_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    error_type = "unsupported_media_type"


class InvalidPayload(ApiError):
    """The JSON is readable but does not describe a request we can serve."""

    status = 422
    error_type = "validation_error"


class QueueFull(ApiError):
    status = 429
    error_type = "queue_full"


class NotImplementedYet(ApiError):
    status = 501
    error_type = "not_implemented"


ENCODERS_NOT_YET = (
    "embedding, classification and reranking readers are not supported yet: mmserve serves generation "
    "(text and vision-language) models"
)


class NoLiveReader(ApiError):
    status = 503
    error_type = "no_live_reader"


class RedisUnavailable(ApiError):
    status = 503
    error_type = "redis_unavailable"


class GatewayTimeout(ApiError):
    status = 504
    error_type = "timeout"


def count_error(error_type: str) -> None:
    """Count an error in the app's metrics (mmserve_api_errors_total)."""
    from api.state import app_state  # the state module imports the metrics, which import nothing of errors

    with contextlib.suppress(RuntimeError, KeyError):  # outside an app, or before the app is set up
        app_state().metrics.errors.labels(error_type).inc()


def _on_openai_port() -> bool:
    from api.state import app_state

    if not has_request_context():
        return False
    try:
        openai_port = app_state().settings.openai_port
    except (RuntimeError, KeyError):
        return False
    return request.environ.get("SERVER_PORT") == str(openai_port)


def error_response(
    message: str,
    error_type: str,
    status: int,
    *,
    retry_after: int | None = None,
    param: str | None = None,
) -> Response:
    count_error(error_type)
    if _on_openai_port():
        from api.openai.errors import openai_error_body, openai_status

        status = openai_status(status)
        response = jsonify(openai_error_body(message, error_type, status, param=param))
    else:
        response = jsonify(error=message, error_type=error_type)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed", 413: PayloadTooLarge.error_type}


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error_response(
            error.message,
            error.error_type,
            error.status,
            retry_after=error.retry_after,
            param=getattr(error, "param", None),
        )

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        # werkzeug's own errors: unknown route (NotFound), wrong method,
        # body over MAX_CONTENT_LENGTH (RequestEntityTooLarge -> payload_too_large).
        status = error.code or 500
        error_type = _HTTP_ERROR_TYPES.get(status) or _snake_case(type(error).__name__)
        response = error_response(error.description or error.name, error_type, status)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(error.valid_methods))
        return response

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    def _redis_down(error: redis.exceptions.RedisError) -> Response:
        log.warning("redis unavailable: %s", error)
        return error_response(
            f"redis is unavailable: {error}",
            RedisUnavailable.error_type,
            503,
            retry_after=defaults.RETRY_AFTER_REDIS_UNAVAILABLE_SECONDS,
        )

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("unhandled error")
        return error_response("internal server error", "internal_error", 500)
