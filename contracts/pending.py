"""Commands accepted but not yet applied, per intent, in Redis.

`pending:{account}:{intent}` is a hash from Idempotency-Key to the object as the command will
leave it. Reads use it to answer 425 Too Early instead of 404, and to show a client the state
its 202 announced even before the processor applied the command.

A marker never outlives the publish it announces:

- the edge adds it before publishing, with a deadline: the end of its request. A marker still
  `publishing` after its deadline belongs to a publish that failed, timed out or died with its
  edge; reads ignore and delete it;
- once RabbitMQ confirmed the command, the edge marks it `queued` (no deadline);
- the processor removes it when the command is committed, and when the command is
  dead-lettered (processor/deadletters.py). Reads also drop markers whose command the Postgres
  inbox has applied, for when Redis was down at that moment.

The processor's removals also notify the intent's status channel (contracts/status.py), in the
same pipeline after the HDEL: the object a client reads changes when a marker goes, also when
its command was refused or dead-lettered and so left no event for the status fan-out.

An entry is `<at ns>:<deadline ns, 0 once queued>:<object JSON>`, so confirming it is a string
operation in Redis that leaves the object as it was written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from contracts import status


def confirm_lua(name: str, field: str) -> str:
    """Lua that marks the `publishing` entry `field` of the hash `name` (Lua expressions, e.g.
    KEYS[1] and ARGV[1]) `queued`, only if it is still there: the processor may have applied
    and removed it already, and it must not come back. Also part of the edge's script that
    stores a POST's answer (edge/idempotency.py), so both take one round trip."""
    return f"""
local raw = redis.call('HGET', {name}, {field})
if raw then
  local at, object = string.match(raw, '^(%d+):%d+:(.*)$')
  if at then redis.call('HSET', {name}, {field}, at .. ':0:' .. object) end
end
"""


_CONFIRM = confirm_lua("KEYS[1]", "ARGV[1]")
# Removes the entry ARGV[1] only if it still is ARGV[2].
_REMOVE_IF = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Marker:
    """A marker to write: the hash `name`, its field `key` (the Idempotency-Key) and `entry`;
    the hash lives `ttl_s` from then. Written by `PendingCommands.add`, or by the edge's claim
    of a create's key in the same round trip (edge/idempotency.py)."""
    name: str
    key: str
    entry: bytes
    ttl_s: int


def redis_key(account_id: str, intent_id: str) -> str:
    return f"pending:{account_id}:{intent_id}"


def _entry(value: bytes | str) -> tuple[int, int, dict[str, Any]]:
    """(accepted at, deadline or 0, object)."""
    raw = value.encode() if isinstance(value, str) else value
    if raw[:1] == b"{":  # the format before deadlines: a queued marker
        old = orjson.loads(raw)
        return old["at"], 0, old["object"]
    at, until, obj = raw.split(b":", 2)
    return int(at), int(until), orjson.loads(obj)


class PendingCommands:
    def __init__(self, redis: aioredis.Redis, *, ttl_s: int,
                 notify_deployment: str | None = None) -> None:
        """`notify_deployment`: removals notify the intents' status channels of this
        deployment (the processor's); None for the edge, whose removals change nothing."""
        self._redis = redis
        self._ttl_s = ttl_s
        self._deployment = notify_deployment
        self._confirm = redis.register_script(_CONFIRM)
        self._remove_if = redis.register_script(_REMOVE_IF)

    def marker(self, account_id: str, intent_id: str, key: str, obj: dict[str, Any],
               *, deadline_ns: int) -> Marker:
        """The marker of a command about to be published; unless confirmed, it means nothing
        after `deadline_ns` (Unix time)."""
        entry = b"%d:%d:%s" % (time.time_ns(), deadline_ns, orjson.dumps(obj))
        return Marker(redis_key(account_id, intent_id), key, entry, self._ttl_s)

    async def add(self, marker: Marker) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(marker.name, marker.key, marker.entry)
            pipe.expire(marker.name, marker.ttl_s)
            await pipe.execute()

    async def confirm(self, account_id: str, intent_id: str, key: str) -> None:
        """RabbitMQ holds the command: the marker stands until the command is applied."""
        await self._confirm(keys=[redis_key(account_id, intent_id)], args=[key])

    async def remove_marker(self, marker: Marker) -> None:
        """Removes `marker` if it is still the entry written (a later one stays)."""
        await self._remove_if(keys=[marker.name], args=[marker.key, marker.entry])

    async def remove(self, account_id: str, intent_id: str, key: str) -> None:
        if self._deployment is None:
            await self._redis.hdel(redis_key(account_id, intent_id), key)
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hdel(redis_key(account_id, intent_id), key)
            pipe.publish(status.channel(self._deployment, account_id, intent_id),
                         b'{"applied":"command"}')
            await pipe.execute()

    async def all(self, account_id: str, intent_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(Idempotency-Key, object) of each live pending command, oldest first."""
        name = redis_key(account_id, intent_id)
        raw = await self._redis.hgetall(name)
        now = time.time_ns()
        live: list[tuple[int, str, dict[str, Any]]] = []
        stale: list[str] = []
        for field, value in raw.items():
            key = field.decode() if isinstance(field, bytes) else field
            at, deadline, obj = _entry(value)
            if deadline and deadline < now:
                stale.append(key)
            else:
                live.append((at, key, obj))
        if stale:
            await self._redis.hdel(name, *stale)
        live.sort(key=lambda e: e[0])
        return [(key, obj) for _, key, obj in live]
