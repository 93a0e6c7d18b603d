"""The gunicorn entry point: `gunicorn -k gevent 'api.wsgi:app_from_env()'`.

Builds the app from MMSERVE_* environment variables (set by the `mmserve` CLI).
Nothing happens at import time: gunicorn calls the factory in each worker
process, after gevent has patched the standard library."""

from __future__ import annotations

import os
from collections.abc import Mapping

from flask import Flask

from api.app import create_app
from shared import defaults, logs
from shared.settings import ApiSettings


def settings_from_env(environ: Mapping[str, str]) -> ApiSettings:
    """ApiSettings from MMSERVE_* variables; unset or empty ones keep their default."""

    def value(name: str) -> str | None:
        return environ.get(f"MMSERVE_{name}") or None

    def number(name: str, kind: type[int] | type[float], default: int | float | None) -> int | float | None:
        text = value(name)
        if text is None:
            return default
        try:
            return kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise ValueError(f"MMSERVE_{name} must be {expected}, got {text!r}") from None

    def flag(name: str) -> bool:
        text = (value(name) or "").strip().lower()
        if text in ("", "0", "false", "no", "off"):
            return False
        if text in ("1", "true", "yes", "on"):
            return True
        raise ValueError(f"MMSERVE_{name} must be true or false, got {text!r}")

    redis_url = value("REDIS_URL")
    if redis_url is None:
        raise ValueError("MMSERVE_REDIS_URL is not set: the API needs the Redis the workers use")
    return ApiSettings(
        redis_url=redis_url,
        port=number("PORT", int, defaults.INFERENCE_PORT),
        management_port=number("MANAGEMENT_PORT", int, defaults.MANAGEMENT_PORT),
        openai_port=number("OPENAI_PORT", int, defaults.OPENAI_PORT),
        body_size_limit_bytes=number("BODY_SIZE_LIMIT_BYTES", int, defaults.DEFAULT_BODY_SIZE_LIMIT_BYTES),
        max_queue_depth=number("MAX_QUEUE_DEPTH", int, None),
        api_key=value("API_KEY"),
        first_event_timeout_seconds=number(
            "QUEUE_TIMEOUT_SECONDS", float, defaults.FIRST_EVENT_TIMEOUT_SECONDS
        ),
        next_event_timeout_seconds=number(
            "NEXT_EVENT_TIMEOUT_SECONDS", float, defaults.NEXT_EVENT_TIMEOUT_SECONDS
        ),
        supervisor_id=value("SUPERVISOR_ID"),
        keepalive_seconds=number("SSE_KEEPALIVE_SECONDS", float, defaults.SSE_KEEPALIVE_SECONDS),
        image_dir=value("IMAGE_DIR"),
        allow_remote_images=flag("ALLOW_REMOTE_IMAGES"),
        max_image_pixels=number("MAX_IMAGE_PIXELS", int, defaults.DEFAULT_MAX_IMAGE_PIXELS),
    )


def app_from_env() -> Flask:
    logs.configure(
        os.environ.get("MMSERVE_LOG_LEVEL") or "INFO", os.environ.get("MMSERVE_LOG_FORMAT") or "text"
    )
    return create_app(settings_from_env(os.environ))
