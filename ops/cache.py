"""The Redis client every process uses, with timeouts shorter than a request's lock."""

from __future__ import annotations

import redis.asyncio as aioredis

from ops.settings import Settings

# Connections a process holds to Redis at most. Redis serves one command at a time, so more
# do not make it answer sooner; a call beyond them waits for a free one (backpressure), up to
# the database timeout, instead of failing at once as a bounded pool that does not block does.
MAX_CONNECTIONS = 64


def redis_client(settings: Settings) -> aioredis.Redis:
    # Redis answers in well under a millisecond; a call that takes the database timeout is a
    # Redis that is gone, and the request must fail while it still holds its key.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=MAX_CONNECTIONS, timeout=settings.db_timeout_s,
        socket_timeout=settings.db_timeout_s, socket_connect_timeout=settings.db_timeout_s)
    return aioredis.Redis.from_pool(pool)
