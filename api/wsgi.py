"""The gunicorn entry point: `gunicorn -k gevent 'api.wsgi:app_from_env()'`.

The app is built from the MMSERVE_* environment variables the `mmserve` CLI sets (shared/settings.py
declares them). Nothing happens at import time: gunicorn calls the factory in each worker process, after
gevent has patched the standard library."""

from __future__ import annotations

import os
from collections.abc import Mapping

from flask import Flask

from api.app import create_app
from shared import logs
from shared.settings import ApiSettings, from_environment


def settings_from_env(environ: Mapping[str, str]) -> ApiSettings:
    """ApiSettings from MMSERVE_* variables; unset or empty ones keep their default."""
    if not environ.get("MMSERVE_REDIS_URL"):
        raise ValueError("MMSERVE_REDIS_URL is not set: the API needs the Redis the workers use")
    return from_environment(ApiSettings, environ)


def app_from_env() -> Flask:
    settings = settings_from_env(os.environ)
    logs.configure(settings.log_level, settings.log_format)
    return create_app(settings)
