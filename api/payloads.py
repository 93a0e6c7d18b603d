"""Reading a request's JSON body: content type, size, UTF-8, JSON, then a
pydantic model (the generation payload, or the body of a management or
tokenizer route), with error messages that name each offending key and say why."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from flask import Request
from pydantic import BaseModel, ValidationError

from api.errors import (
    InvalidPayload,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from shared.payload import GenerateRequest

Model = TypeVar("Model", bound=BaseModel)


def is_json_mimetype(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def read_json_body(request: Request, limit_bytes: int) -> Any:
    """The body as a JSON value; 413 / 415 / 400 when it cannot be one."""
    if request.content_length is not None and request.content_length > limit_bytes:
        raise PayloadTooLarge(f"the body is {request.content_length} bytes; the limit is {limit_bytes}")
    if not is_json_mimetype(request.mimetype):
        raise UnsupportedMediaType(
            f"expected Content-Type application/json, got {request.mimetype or 'none'}"
        )
    # A chunked body has no Content-Length. Werkzeug stops reading it at
    # MAX_CONTENT_LENGTH, which create_app sets one byte above the limit, so
    # an oversize body shows up here as a body longer than the limit.
    body = request.get_data(cache=True)
    if len(body) > limit_bytes:
        raise PayloadTooLarge(f"the body is over the limit of {limit_bytes} bytes")
    return parse_json(body, what="the body")


def parse_json(data: bytes | str, *, what: str) -> Any:
    """`data` (UTF-8) as a JSON value; 400 naming `what` when it is not one."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"{what} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise InvalidRequest(f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, or an integer with too many digits
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_generate_request(request: Request, limit_bytes: int) -> GenerateRequest:
    """A validated payload whose every key this server can honour, else the ApiError to answer."""
    return validate_payload(read_json_body(request, limit_bytes), what="the body")


def read_model_body(request: Request, limit_bytes: int, model: type[Model]) -> Model:
    """The body validated as `model`, else the ApiError to answer (422 naming each offending key)."""
    body = read_json_body(request, limit_bytes)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidPayload(describe_validation_error(exc)) from None


def validate_payload(data: Any, *, what: str) -> GenerateRequest:
    """A parsed JSON value as a payload this server can honour, else the ApiError to answer."""
    if not isinstance(data, dict):
        raise InvalidPayload(f"{what} must be a JSON object, got {_json_type(data)}")
    try:
        payload = GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise InvalidPayload(describe_validation_error(exc)) from None
    return payload


def describe_validation_error(error: ValidationError) -> str:
    """One message naming every offending key: "unknown key(s): a, b; max_new_tokens: ..."."""
    unknown: list[str] = []
    by_key: dict[str, list[dict[str, Any]]] = {}
    model_level: list[str] = []
    for detail in error.errors(include_url=False):
        location = detail["loc"]
        if detail["type"] == "extra_forbidden":
            unknown.append(str(location[0]))
        elif not location:
            model_level.append(_clean_message(detail["msg"]))
        else:
            by_key.setdefault(str(location[0]), []).append(detail)

    parts = []
    if unknown:
        parts.append(f"unknown key(s): {', '.join(unknown)}")
    parts.extend(_describe_key(key, details) for key, details in by_key.items())
    parts.extend(model_level)
    return "invalid payload: " + "; ".join(parts)


def _describe_key(key: str, details: list[dict[str, Any]]) -> str:
    # A key typed as a union (text: str | list[str]) reports one error per
    # member, each located under the member's name: report the member that got
    # furthest into the value, or all members when none did.
    branches = list(
        dict.fromkeys(
            detail["loc"][1]
            for detail in details
            if len(detail["loc"]) > 1 and isinstance(detail["loc"][1], str)
        )
    )
    if len(branches) > 1:
        deepest = max(len(detail["loc"]) for detail in details)
        best = [detail for detail in details if len(detail["loc"]) == deepest]
        if deepest == 2:
            value = details[0]["input"]
            return f"{key}: expected {' or '.join(branches)}, got {_json_type(value)}"
        details = [{**detail, "loc": (key, *detail["loc"][2:])} for detail in best]
    return "; ".join(_describe_detail(detail) for detail in details)


def _describe_detail(detail: dict[str, Any]) -> str:
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in detail["loc"]).lstrip(".")
    message = _clean_message(detail["msg"])
    if detail["type"] == "missing":
        return f"{path}: required"
    value = detail.get("input")
    if isinstance(value, bool | int | float | str) and detail["type"] != "value_error":
        shown = json.dumps(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return f"{path}: {message} (got {shown})"
    return f"{path}: {message}"


def _clean_message(message: str) -> str:
    return message.removeprefix("Value error, ")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
