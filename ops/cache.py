"""The Redis client every process uses, with timeouts shorter than a request's lock."""

from __future__ import annotations

import redis.asyncio as aioredis

from ops.settings import Settings


def redis_client(settings: Settings) -> aioredis.Redis:
    # Redis answers in well under a millisecond; a call that takes the database timeout is a
    # Redis that is gone, and the request must fail while it still holds its key.
    return aioredis.from_url(settings.redis_url, socket_timeout=settings.db_timeout_s,
                             socket_connect_timeout=settings.db_timeout_s)
