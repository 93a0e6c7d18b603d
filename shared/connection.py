"""Building redis-py clients the same way everywhere."""

from __future__ import annotations

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
