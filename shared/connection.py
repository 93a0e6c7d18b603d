"""Building redis-py clients the same way everywhere."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from shared import defaults


def connect(url: str, *, socket_timeout: float | None = defaults.REDIS_SOCKET_TIMEOUT_SECONDS) -> redis.Redis:
    """A client with a roomy pool and timeouts, so a dead Redis fails fast
    instead of hanging a request. Works for redis://, rediss:// and unix://."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=defaults.REDIS_MAX_CONNECTIONS,
        timeout=defaults.REDIS_CONNECT_TIMEOUT_SECONDS * 5,
        socket_timeout=socket_timeout,
        socket_connect_timeout=defaults.REDIS_CONNECT_TIMEOUT_SECONDS,
        health_check_interval=30,
    )
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
