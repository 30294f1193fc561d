"""Poison messages are dead-lettered once, never loop, and never hold up other intents."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import orjson

from contracts import ids
from contracts.commands import CreateIntent
from contracts.topology import Topology
from edge.idempotency import fingerprint
from ops.settings import Settings
from tests.conftest import Client, Stack, make_settings, stack
from tests.support import VISA


@asynccontextmanager
async def broker(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        yield await connection.channel(publisher_confirms=True)


async def publish_raw(channel: aio_pika.abc.AbstractChannel, settings: Settings, body: bytes,
                      message_id: str, routing_key: str = "0") -> None:
    """Straight to the commands exchange, as a buggy or hostile publisher would."""
    exchange = await channel.get_exchange(Topology(settings.amqp_prefix, 1).commands)
    await exchange.publish(
        aio_pika.Message(body, message_id=message_id, delivery_mode=2), routing_key=routing_key,
        mandatory=True)


async def dead_letters(channel: aio_pika.abc.AbstractChannel, settings: Settings,
                       count: int, within_s: float = 20.0) -> list[dict[str, Any]]:
    """Wait for `count` messages in the dead-letter queue, then make sure no more follow
    (a looping message would be dead-lettered again and again). Takes them off the queue."""
    queue = await channel.get_queue(Topology(settings.amqp_prefix, 1).dead)
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + within_s
    quiet_until: float | None = None
    while quiet_until is None or time.monotonic() < quiet_until:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            if len(found) >= count and quiet_until is None:
                quiet_until = time.monotonic() + 1.5
            assert time.monotonic() < deadline, f"only {len(found)} of {count} dead-lettered"
            await asyncio.sleep(0.05)
            continue
        headers: dict[str, Any] = dict(message.headers or {})
        death: list[dict[str, Any]] = headers.get("x-death") or [{}]
        found.append({"message_id": message.message_id, "body": message.body,
                      "reason": _text(death[0].get("reason")),
                      "queue": _text(death[0].get("queue")), "deaths": death[0].get("count")})
    return found


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


async def partition_depths(channel: aio_pika.abc.AbstractChannel, settings: Settings) -> int:
    topology = Topology(settings.amqp_prefix, settings.partitions)
    total = 0
    for p in range(settings.partitions):
        declared = await channel.declare_queue(topology.queue(p), passive=True)
        total += declared.declaration_result.message_count or 0
    return total


def create_command(settings: Settings, account_id: str, **overrides: Any) -> CreateIntent:
    key = str(uuid.uuid4())
    params = {"amount": 4200, "currency": "usd", "customer": None, "description": None,
              "metadata": {}, "payment_method": VISA, "confirm": True}
    fields: dict[str, Any] = {
        "account_id": account_id, "intent_id": ids.intent_id(settings.secret_bytes, account_id,
                                                            key),
        "request_id": "req_poison", "accepted_at": int(time.time()), "idempotency_key": key,
        "fingerprint": fingerprint("POST", "/v1/payment_intents", params), **params}
    return CreateIntent(**{**fields, **overrides})


async def intent_on_partition(s: Stack, api: Client, partition: int) -> str:
    """Create (and confirm) an intent whose id falls on the given partition."""
    topology = Topology(s.settings.amqp_prefix, s.settings.partitions)
    while True:
        key = str(uuid.uuid4())
        if topology.partition(ids.intent_id(s.settings.secret_bytes, api.account_id,
                                            key)) == partition:
            break
    created = await api.post("/v1/payment_intents", {
        "amount": "700", "currency": "usd", "payment_method": VISA, "confirm": "true"}, key=key)
    assert created.status == 202, created.body
    return str(created.body["id"])


async def test_undecodable_messages_are_dead_lettered(migrated: None) -> None:
    async with stack(make_settings()) as s, broker(s.settings) as channel:
        api = await s.client()
        unknown = orjson.dumps({
            "type": "payment_intent.explode", "account_id": api.account_id,
            "intent_id": "pi_" + "x" * 24, "request_id": "req_x", "accepted_at": 0})
        poison = {
            "garbage": b"\x00\xff\xfenot json at all",
            "unknown-type": unknown,
            "not-an-object": b"[1, 2, 3]",
            "wrong-field-type": orjson.dumps({
                **orjson.loads(create_command(s.settings, api.account_id).encode()),
                "amount": "4200"}),
        }
        for message_id, body in poison.items():
            await publish_raw(channel, s.settings, body, message_id)
        # The processor keeps working, on that partition too.
        healthy = await intent_on_partition(s, api, 0)
        assert (await api.wait_for(healthy))["status"] == "succeeded"

        dead = await dead_letters(channel, s.settings, len(poison))
        assert sorted(d["message_id"] for d in dead) == sorted(poison)
        for d in dead:
            assert d["body"] == poison[d["message_id"]]
            # Rejected on first sight: not redelivered until the delivery limit ran out.
            assert (d["reason"], d["deaths"]) == ("rejected", 1), d
            assert d["queue"] == Topology(s.settings.amqp_prefix, 1).queue(0)
        assert await partition_depths(channel, s.settings) == 0


async def test_command_that_can_never_apply_is_dead_lettered_without_blocking(
    migrated: None
) -> None:
    settings = make_settings()
    async with stack(settings) as s, broker(settings) as channel:
        api = await s.client()
        topology = Topology(settings.amqp_prefix, settings.partitions)
        # Decodes, but fails a constraint every time: an account that does not exist (foreign
        # key), and an intent id of the wrong shape (check) for a real account.
        orphan = create_command(settings, ids.random_id("acct", 24))
        misshapen = create_command(settings, api.account_id, intent_id="pi_short")
        poison = {orphan.message_id: orphan, misshapen.message_id: misshapen}
        for command in poison.values():
            partition = topology.routing_key(command.intent_id)
            await publish_raw(channel, settings, command.encode(), command.message_id,
                              routing_key=partition)
        # Intents queued right behind them on their partitions still go through.
        healthy = await asyncio.gather(*(
            intent_on_partition(s, api, topology.partition(c.intent_id))
            for c in poison.values() for _ in range(3)))
        for intent_id in healthy:
            assert (await api.wait_for(intent_id))["status"] == "succeeded"

        dead = await dead_letters(channel, settings, len(poison))
        assert sorted(d["message_id"] for d in dead) == sorted(poison)
        for d in dead:
            # Dead-lettered by the processor after its bounded retries, once; not bounced
            # back to the queue until the broker's delivery limit gave up on it.
            assert (d["reason"], d["deaths"]) == ("rejected", 1), d
        assert await partition_depths(channel, settings) == 0
        assert await s.db.fetchval("SELECT count(*) FROM inbox WHERE request_id = 'req_poison' "
                                   "AND object_id = ANY($1)",
                                   [c.intent_id for c in poison.values()]) == 0
