from __future__ import annotations

import os
import signal
import sys
import threading

import pytest

from mmserve import supervisor
from mmserve.redis_server import free_port
from mmserve.supervisor import Child, Supervisor


@pytest.fixture(autouse=True)
def _restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def unreachable() -> str:
    return f"http://127.0.0.1:{free_port()}/readyz"


def test_a_worker_that_keeps_failing_at_start_stops_everything(monkeypatch):
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_SECONDS", 0.1)
    worker = Child("worker-0", python("raise SystemExit(3)"), dict(os.environ), restart=True)
    api = Child("api", python("import time; time.sleep(60)"), dict(os.environ), restart=False)
    assert Supervisor([api, worker], unreachable()).run() == 1
    assert worker.restarts == supervisor.MAX_QUICK_FAILURES - 1
    assert not api.running


def test_the_api_exiting_stops_the_workers():
    worker = Child("worker-0", python("import time; time.sleep(60)"), dict(os.environ), restart=True)
    api = Child("api", python("raise SystemExit(1)"), dict(os.environ), restart=False)
    assert Supervisor([api, worker], unreachable()).run() == 1
    assert not worker.running


def test_sigterm_stops_every_child_and_succeeds():
    children = [
        Child(name, python("import time; time.sleep(60)"), dict(os.environ), restart=True)
        for name in ("api", "worker-0", "worker-1")
    ]
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert Supervisor(children, unreachable()).run() == 0
    finally:
        timer.cancel()
    assert not any(child.running for child in children)


def test_readiness_is_asked_with_the_api_key(monkeypatch):
    asked = []

    class Answer:
        status_code = 200

    def get(url, headers=None, timeout=None):
        asked.append(headers)
        return Answer()

    monkeypatch.setattr(supervisor.requests, "get", get)
    assert supervisor.Supervisor([], "http://api/readyz", api_key="k")._ready()
    assert supervisor.Supervisor([], "http://api/readyz")._ready()
    assert asked == [{"X-API-Key": "k"}, {}]  # without it, --api-key's 401s would never say ready
