"""The Redis fast path of idempotency.

`idem:{account}:{key}` holds either an in-flight record (set with SET NX and a short expiry, so
a dead edge frees the key) or, once answered, the stored response for the retention period.
Only the request that holds the in-flight record (by its token) may finish or release it.
The Postgres inbox stays the authority: see edge/intents.py for what happens when Redis has
forgotten a key that Postgres remembers.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from contracts.errors import IdempotencyKeyInUse, IdempotencyMismatch, InvalidRequest

MAX_KEY_LENGTH = 255

# Replace the value only if it is still our in-flight record.
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return false
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def check_key(key: str | None) -> str:
    if key is None or key == "":
        raise InvalidRequest("Every POST needs an Idempotency-Key header (1-255 characters).",
                             code="parameter_missing", param="Idempotency-Key")
    if len(key) > MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
        raise InvalidRequest("The Idempotency-Key header must be 1-255 printable ASCII "
                             "characters.", code="parameter_invalid", param="Idempotency-Key")
    return key


def fingerprint(method: str, path: str, params: dict[str, Any]) -> str:
    canonical = orjson.dumps([method, path, params], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True, slots=True)
class Stored:
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    redis_key: str
    record: bytes


class IdempotencyStore:
    def __init__(self, redis: aioredis.Redis, *, ttl_s: int, lock_ms: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._lock_ms = lock_ms
        self._finish = redis.register_script(_FINISH)
        self._release = redis.register_script(_RELEASE)

    async def claim(self, account_id: str, key: str, fp: str) -> Claim | Stored:
        """Claim the key for this request, or the stored answer to replay.

        Raises IdempotencyKeyInUse while another request holds it and IdempotencyMismatch when
        the key was used for a different request.
        """
        redis_key = f"idem:{account_id}:{key}"
        record = orjson.dumps({"state": "in_flight", "fp": fp, "token": secrets.token_hex(8)})
        # Two tries: the other holder's record may expire between our SET and GET.
        for _ in range(2):
            if await self._redis.set(redis_key, record, nx=True, px=self._lock_ms):
                return Claim(redis_key, record)
            raw = await self._redis.get(redis_key)
            if raw is None:
                continue
            existing = orjson.loads(raw)
            if existing["fp"] != fp:
                raise mismatch(key)
            if existing["state"] == "in_flight":
                break
            return Stored(existing["status"], existing["body"].encode())
        raise IdempotencyKeyInUse(
            "There is currently another in-progress request using this Idempotency-Key; "
            "retry shortly.", headers={"Stripe-Should-Retry": "true", "Retry-After": "1"})

    async def finish(self, claim: Claim, fp: str, status: int, body: bytes) -> None:
        done = orjson.dumps({"state": "done", "fp": fp, "status": status, "body": body.decode()})
        await self._finish(keys=[claim.redis_key], args=[claim.record, done, self._ttl_s])

    async def release(self, claim: Claim) -> None:
        await self._release(keys=[claim.redis_key], args=[claim.record])


def mismatch(key: str) -> IdempotencyMismatch:
    return IdempotencyMismatch(
        f"Keys for idempotent requests can only be used with the same parameters they were "
        f"first used with. Try using a key other than '{key[:60]}' if you meant to execute a "
        "different request.", param="Idempotency-Key")
