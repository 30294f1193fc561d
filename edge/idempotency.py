"""The Redis fast path of idempotency.

`idem:{account}:{key}` holds one of:

- an in-flight record: set with SET NX and the lock's expiry, naming the edge process that
  owns it. Only that request (by its token) may finish, park or release it. If its edge dies,
  the next retry takes the key over as soon as the edge's liveness key (`edge:{owner}`,
  renewed by a heartbeat) has expired, instead of waiting for the lock to run out;
- an unknown outcome: the command's publish timed out and it may still be queued. The key
  keeps its fingerprint for the retention period, so a retry with the same parameters runs
  again (the processor's inbox dedupes the command if both copies land) and one with other
  parameters is an idempotency error, never a second, different command under the same key;
- the stored answer, replayed for the retention period.

Two requests with the same key and parameters running at once do no harm (the inbox applies
the command once); the lock only keeps that rare. The Postgres inbox stays the authority: see
edge/accept.py for a key that Postgres remembers and Redis forgot.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from contracts import pending
from contracts.errors import IdempotencyKeyInUse, IdempotencyMismatch, InvalidRequest

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255

# Claim the key if nobody holds it (1), and then, with KEYS[2], write the pending marker of the
# command the request publishes (contracts/pending.py): one round trip for both. Otherwise the
# record found there, or 0 if it expired in between.
_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if KEYS[2] then
    redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
    redis.call('EXPIRE', KEYS[2], ARGV[5])
  end
  return 1
end
return redis.call('GET', KEYS[1]) or 0
"""
# Replace the value only if it is still our in-flight record.
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return false
"""
# The same, after confirming the pending marker of the command the answer announces
# (KEYS[2], field ARGV[4]): the command is queued whether or not the record is still ours.
_FINISH_QUEUED = pending.confirm_lua("KEYS[2]", "ARGV[4]") + _FINISH
# Replace the value only if it is still the one read (a takeover after a dead owner).
_SWAP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
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
    # "new", or how an earlier attempt with this key ended: "taken_over", "unknown".
    how: str = "new"
    # Whether the claim wrote the pending marker it was given.
    marked: bool = False


@dataclass(frozen=True, slots=True)
class Queued:
    """A command RabbitMQ confirmed, whose pending marker is still to be confirmed."""
    account_id: str
    intent_id: str
    key: str


def alive_key(owner: str) -> str:
    return f"edge:{owner}"


class IdempotencyStore:
    def __init__(
        self, redis: aioredis.Redis, *, ttl_s: int, lock_ms: int, owner: str,
        deployment: str = "payonce",
    ) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._lock_ms = lock_ms
        self.owner = owner
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(_FINISH)
        self._finish_queued = redis.register_script(_FINISH_QUEUED)
        self._swap = redis.register_script(_SWAP)
        self._release = redis.register_script(_RELEASE)
        # Set once by the first edge of the deployment to beat; its disappearance tells every
        # edge that Redis lost its data.
        self._epoch_key = f"epoch:{deployment}"
        self._epoch: bytes | str | None = None
        self._lost_at: float | None = None

    async def heartbeat(self, ttl_ms: int) -> None:
        """This edge is alive for the next `ttl_ms`: its keys in flight stay its own.

        Also notices when Redis lost its data (flushed, or restarted without persistence):
        the epoch key it shares with the other edges vanished or changed since the last beat.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(alive_key(self.owner), b"1", px=ttl_ms)
            pipe.set(self._epoch_key, secrets.token_hex(8), nx=True)
            pipe.get(self._epoch_key)
            _, _, epoch = await pipe.execute()
        self._saw_epoch(epoch)

    def _saw_epoch(self, epoch: bytes | str | None) -> None:
        if self._epoch is not None and epoch != self._epoch:
            self._lost_at = time.monotonic()
            log.warning("Redis lost its data: unknown intents read as not ready for a while")
        if epoch is not None:
            self._epoch = epoch

    async def lost_within(self, seconds: float) -> bool:
        """Whether Redis lost its data (and with it the markers of commands still queued) in
        the last `seconds`. Asks Redis rather than wait for the next heartbeat to notice."""
        if self._lost_at is None or time.monotonic() - self._lost_at >= seconds:
            self._saw_epoch(await self._redis.get(self._epoch_key))
        return self._lost_at is not None and time.monotonic() - self._lost_at < seconds

    async def retire(self) -> None:
        """This edge stops: keys it still holds may be taken over at once."""
        await self._redis.delete(alive_key(self.owner))

    async def claim(self, account_id: str, key: str, fp: str,
                    marker: pending.Marker | None = None) -> Claim | Stored:
        """Claim the key for this request, or the stored answer to replay. With `marker`, a
        new claim (`how` "new") also writes that pending marker (`Claim.marked`).

        Raises IdempotencyKeyInUse while another request holds it and IdempotencyMismatch when
        the key was used for a different request.
        """
        redis_key = f"idem:{account_id}:{key}"
        record = orjson.dumps({"state": "in_flight", "fp": fp, "token": secrets.token_hex(8),
                               "owner": self.owner})
        args: list[bytes | str | int]
        if marker is None:
            keys, args = [redis_key], [record, self._lock_ms]
        else:
            keys = [redis_key, marker.name]
            args = [record, self._lock_ms, marker.key, marker.entry, marker.ttl_s]
        # A few tries: the record read may expire, or be swapped by a concurrent retry, between
        # our SET and GET.
        for _ in range(3):
            raw = await self._claim(keys=keys, args=args)
            if raw == 1:
                return Claim(redis_key, record, marked=marker is not None)
            if raw == 0:
                continue
            existing = orjson.loads(raw)
            if existing["fp"] != fp:
                raise mismatch(key)
            state = existing["state"]
            if state == "done":
                return Stored(existing["status"], existing["body"].encode())
            if state == "in_flight" and not await self._owner_dead(existing):
                break
            # An unknown outcome, or an owner known dead: this request runs it again.
            if await self._swap(keys=[redis_key], args=[raw, record, self._lock_ms]):
                return Claim(redis_key, record, "unknown" if state == "unknown" else "taken_over")
        raise IdempotencyKeyInUse(
            "There is currently another in-progress request using this Idempotency-Key; "
            "retry shortly.", headers={"Stripe-Should-Retry": "true", "Retry-After": "1"})

    async def finish(self, claim: Claim, fp: str, status: int, body: bytes,
                     queued: Queued | None = None) -> None:
        """Store the answer for replays; with `queued`, confirm that command's pending marker
        in the same round trip (contracts/pending.py)."""
        done = orjson.dumps({"state": "done", "fp": fp, "status": status, "body": body.decode()})
        if queued is None:
            await self._finish(keys=[claim.redis_key], args=[claim.record, done, self._ttl_s])
            return
        await self._finish_queued(
            keys=[claim.redis_key, pending.redis_key(queued.account_id, queued.intent_id)],
            args=[claim.record, done, self._ttl_s, queued.key])

    async def _owner_dead(self, record: dict[str, Any]) -> bool:
        owner = record.get("owner")
        return isinstance(owner, str) and not await self._redis.exists(alive_key(owner))

    async def park(self, claim: Claim, fp: str) -> None:
        """The request's outcome is unknown: keep the key's fingerprint, free it for a retry."""
        unknown = orjson.dumps({"state": "unknown", "fp": fp})
        await self._finish(keys=[claim.redis_key], args=[claim.record, unknown, self._ttl_s])

    async def release(self, claim: Claim) -> None:
        await self._release(keys=[claim.redis_key], args=[claim.record])


def mismatch(key: str) -> IdempotencyMismatch:
    return IdempotencyMismatch(
        f"Keys for idempotent requests can only be used with the same parameters they were "
        f"first used with. Try using a key other than '{key[:60]}' if you meant to execute a "
        "different request.", param="Idempotency-Key")
