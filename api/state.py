"""What one app holds for its requests: settings, the Redis client, the event
hub and the metrics. Kept in `app.extensions`, never in module globals."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import Flask, current_app

from api.metrics import ApiMetrics
from api.relay import EventHub
from shared.settings import ApiSettings

_EXTENSION_KEY = "mmserve"


@dataclass(frozen=True)
class AppState:
    settings: ApiSettings
    connection: redis.Redis
    hub: EventHub
    metrics: ApiMetrics


def install(app: Flask, state: AppState) -> None:
    app.extensions[_EXTENSION_KEY] = state


def state_of(app: Flask) -> AppState:
    return app.extensions[_EXTENSION_KEY]


def app_state() -> AppState:
    """The state of the app handling the current request."""
    return state_of(current_app)
