from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
from flask import Flask

from api.app import create_app
from api.state import state_of
from shared.settings import ApiSettings
from tests.support.api_fakes import INFERENCE_URL, MANAGEMENT_URL, FakeWorker, PortClient


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def connection(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=server)


@pytest.fixture
def make_app(connection: fakeredis.FakeRedis) -> Iterator[Callable[..., Flask]]:
    """Build an app over the fake Redis; its event hub is stopped after the test."""
    apps: list[Flask] = []

    def build(**settings: Any) -> Flask:
        settings = {"first_event_timeout_seconds": 5.0, "next_event_timeout_seconds": 5.0, **settings}
        app = create_app(ApiSettings(redis_url="redis://unused", **settings), connection=connection)
        app.test_client_class = PortClient
        apps.append(app)
        return app

    yield build
    for app in apps:
        state_of(app).hub.stop()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


def client_on(app: Flask, base_url: str) -> PortClient:
    client = app.test_client()
    client.base_url = base_url
    return client


@pytest.fixture
def client(app: Flask) -> PortClient:
    """Requests arriving on the inference port."""
    return client_on(app, INFERENCE_URL)


@pytest.fixture
def management(app: Flask) -> PortClient:
    """Requests arriving on the management port."""
    return client_on(app, MANAGEMENT_URL)


@pytest.fixture
def worker(server: fakeredis.FakeServer) -> Iterator[FakeWorker]:
    fake = FakeWorker(server)
    yield fake
    fake.join()
