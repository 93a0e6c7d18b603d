"""Building redis-py clients the same way everywhere: redis://, rediss://, unix:// and
redis+sentinel:// URLs, the last one a master found through Redis Sentinel:

    redis+sentinel://[user:password@]host:port[,host:port...]/<master-name>[/db]

The user and password are the master's (and its replicas'); the sentinels are asked without.
A client of a Sentinel master asks the sentinels for the master's address whenever it opens a
connection, so after a failover its next connection reaches the new master."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

from shared import defaults

SENTINEL_SCHEME = "redis+sentinel"


@dataclass(frozen=True)
class SentinelTarget:
    """What a redis+sentinel:// URL names."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The sentinels, master name, db and credentials of a redis+sentinel:// URL; ValueError
    saying what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL: {url!r}")
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, password = None, None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if has_password else None)
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.strip().rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"{SENTINEL_SCHEME}:// needs host:port for every sentinel, got {host!r}")
        sentinels.append((name.strip("[]"), int(port)))
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2:
        raise ValueError(
            f"{SENTINEL_SCHEME}:// needs /<master-name>[/db] after the sentinels, got {parts.path!r}"
        )
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the db after the master name is a number, got {path[1]!r}")
    return SentinelTarget(
        sentinels=tuple(sentinels),
        master=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=username,
        password=password,
    )


class BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """A Sentinel master's pool that waits for a free connection, as `connect`'s other pools do,
    instead of failing when all are in use."""


def connect(url: str, *, socket_timeout: float | None = defaults.REDIS_SOCKET_TIMEOUT_SECONDS) -> redis.Redis:
    """A client with a roomy pool and timeouts, so a dead Redis fails fast
    instead of hanging a request. Works for redis://, rediss://, unix:// and redis+sentinel://."""
    options = {
        "max_connections": defaults.REDIS_MAX_CONNECTIONS,
        "timeout": defaults.REDIS_CONNECT_TIMEOUT_SECONDS * 5,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": defaults.REDIS_CONNECT_TIMEOUT_SECONDS,
        "health_check_interval": 30,
    }
    if urlsplit(url).scheme == SENTINEL_SCHEME:
        target = parse_sentinel_url(url)
        sentinel = Sentinel(
            list(target.sentinels),
            socket_timeout=defaults.REDIS_CONNECT_TIMEOUT_SECONDS,
            socket_connect_timeout=defaults.REDIS_CONNECT_TIMEOUT_SECONDS,
        )
        return sentinel.master_for(
            target.master,
            connection_pool_class=BlockingSentinelPool,
            db=target.db,
            username=target.username,
            password=target.password,
            **options,
        )
    pool = redis.BlockingConnectionPool.from_url(url, **options)
    return redis.Redis(connection_pool=pool)


# redis-py reads these query parameters of a rediss:// URL as its SSL connection's arguments.
TLS_QUERY_PARAMETERS = {"ca_file": "ssl_ca_certs", "cert_file": "ssl_certfile", "key_file": "ssl_keyfile"}


def with_tls_files(
    url: str, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> str:
    """`url` carrying the TLS files in its query (where redis-py, RQ and every process handed the
    URL find them): a CA to verify the server with, and a client certificate and key for servers
    that ask for one. Files given again replace those already in the URL. ValueError for files
    given with a URL that is not rediss://, or a key without its certificate."""
    files = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    given = {name: path for name, path in files.items() if path}
    if not given:
        return url
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        flags = ", ".join(f"--redis-{name.replace('_', '-')}" for name in given)
        raise ValueError(f"TLS files ({flags}) are for a rediss:// --redis-url, not a {parts.scheme}:// one")
    if key_file and not (cert_file or "ssl_certfile" in dict(parse_qsl(parts.query))):
        raise ValueError("--redis-key-file needs --redis-cert-file: the key of which client certificate?")
    names = {TLS_QUERY_PARAMETERS[name]: path for name, path in given.items()}
    query = [
        (key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if key not in names
    ]
    return urlunsplit(parts._replace(query=urlencode([*query, *names.items()])))
