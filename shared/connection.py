"""Building redis-py clients the same way everywhere."""

from __future__ import annotations

import redis

from shared import limits


def connect(url: str, *, socket_timeout: float | None = limits.REDIS_SOCKET_TIMEOUT_SECONDS) -> redis.Redis:
    """A client with a roomy pool and timeouts, so a dead Redis fails fast
    instead of hanging a request. Works for redis://, rediss:// and unix://."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=limits.REDIS_MAX_CONNECTIONS,
        timeout=limits.REDIS_CONNECT_TIMEOUT_SECONDS * 5,
        socket_timeout=socket_timeout,
        socket_connect_timeout=limits.REDIS_CONNECT_TIMEOUT_SECONDS,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)
