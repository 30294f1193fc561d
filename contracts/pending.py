"""Commands accepted but not yet applied, per intent, in Redis.

`pending:{account}:{intent}` is a hash from Idempotency-Key to the object as the command will
leave it. The edge adds an entry before publishing; the processor removes it once the command
is committed. Reads use it to answer 425 Too Early instead of 404, and to tell an outcome
that is still coming from one that will never come. The Postgres inbox settles any entry the
processor could not remove (Redis down at that moment).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis.asyncio as aioredis


def redis_key(account_id: str, intent_id: str) -> str:
    return f"pending:{account_id}:{intent_id}"


class PendingCommands:
    def __init__(self, redis: aioredis.Redis, *, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    async def add(self, account_id: str, intent_id: str, key: str, obj: dict[str, Any]) -> None:
        name = redis_key(account_id, intent_id)
        entry = orjson.dumps({"at": time.time_ns(), "object": obj})
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(name, key, entry)
            pipe.expire(name, self._ttl_s)
            await pipe.execute()

    async def remove(self, account_id: str, intent_id: str, key: str) -> None:
        await self._redis.hdel(redis_key(account_id, intent_id), key)

    async def all(self, account_id: str, intent_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(Idempotency-Key, object) of each pending command, oldest first."""
        raw = await self._redis.hgetall(redis_key(account_id, intent_id))
        entries = sorted(((orjson.loads(v), _text(k)) for k, v in raw.items()),
                         key=lambda e: e[0]["at"])
        return [(key, entry["object"]) for entry, key in entries]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
