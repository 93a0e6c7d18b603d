"""Errors on the OpenAI port, in OpenAI's shape:
`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`.

Every ApiError raised while serving the OpenAI port (by its routes, the
admission checks, the image checks, werkzeug) is answered in this shape by
api.errors, which asks `openai_error_body`. `code` is mmserve's error_type
(`model_not_found`, `unsupported_parameter`, `queue_full`, ...), `type` the
OpenAI error class of the status. OpenAI answers invalid requests with 400,
never 422, so a 422 becomes a 400 here."""

from __future__ import annotations

from typing import Any

from api.errors import ApiError


class OpenAIError(ApiError):
    """An error of the OpenAI routes that names the request parameter at fault."""

    status = 400
    error_type = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.param = param


class UnsupportedParameter(OpenAIError):
    """A parameter of OpenAI's API this server does not implement."""

    error_type = "unsupported_parameter"


class ModelNotFound(OpenAIError):
    status = 404
    error_type = "model_not_found"


def openai_status(status: int) -> int:
    return 400 if status == 422 else status


def openai_error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def openai_error_body(message: str, error_type: str, status: int, *, param: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": openai_error_type(status),
            "param": param,
            "code": error_type,
        }
    }
