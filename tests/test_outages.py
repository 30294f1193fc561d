"""A dependency that is down: the edge answers 503 with Stripe-Should-Retry, accepts nothing,
and works again, with the same Idempotency-Key, once the dependency is back."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import pytest
from redis.exceptions import RedisError

from contracts import ids
from contracts.pending import PendingCommands
from contracts.topology import CommandPublisher, PublishFailed, Topology, declare
from ops.loops import Loop
from tests.conftest import make_settings, stack

VALID = {"amount": "1000", "currency": "usd", "payment_method": "pm_card_visa",
         "confirm": "true"}


async def test_redis_unreachable(migrated: None) -> None:
    # Nothing listens on port 1: every Redis call fails to connect.
    async with stack(make_settings(redis_url="redis://127.0.0.1:1/0"), processor=False) as s:
        api = await s.client()
        reply = await api.post("/v1/payment_intents", VALID)
        assert reply.status == 503
        assert reply.error["type"] == "api_error"
        assert reply.headers["Stripe-Should-Retry"] == "true"
        read = await api.get(f"/v1/payment_intents/pi_{'a' * 24}")
        assert read.status == 503
        ready = await api.get("/ready", auth=None)
        assert ready.status == 503 and ready.body["checks"]["redis"] != "ok"
        assert await api.db.fetchval(
            "SELECT count(*) FROM inbox WHERE account_id = $1", api.account_id) == 0


async def test_lost_exchange_is_503_then_recovers(migrated: None) -> None:
    """The commands exchange vanishes (an operator's mistake, a broker reset): the broker
    closes the channel under the publish, so its outcome is unknown. The answer is a 503 that
    says so; the key keeps its fingerprint (another request under it is an idempotency error)
    and no 425 marker stays behind. Once the topology is back the same request succeeds and is
    applied once."""
    async with stack() as s:
        api = await s.client()
        topology = Topology(s.settings.amqp_prefix, s.settings.partitions)
        connection = await aio_pika.connect(s.settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.exchange_delete(topology.commands)
            key = str(uuid.uuid4())
            reply = await api.post("/v1/payment_intents", VALID, key=key)
            assert reply.status == 503, reply.body
            assert reply.error["code"] == "outcome_unknown"
            assert reply.headers["Stripe-Should-Retry"] == "true"
            intent_id = ids.intent_id(s.settings.secret_bytes, api.account_id, key)
            assert (await api.get(f"/v1/payment_intents/{intent_id}")).status == 404
            other = await api.post("/v1/payment_intents", {**VALID, "amount": "999"}, key=key)
            assert other.status == 400 and other.error["type"] == "idempotency_error"
            await declare(channel, topology)
        async with asyncio.timeout(20):
            while True:
                retry = await api.post("/v1/payment_intents", VALID, key=key)
                if retry.status == 202:
                    break
                assert retry.status == 503, retry.body
                await asyncio.sleep(0.2)
        assert retry.body["id"] == intent_id
        done = await api.wait_for(retry.body["id"], ["succeeded"])
        assert done["amount_received"] == 1000
        assert await api.db.fetchval(
            "SELECT count(*) FROM payment_intents WHERE account_id = $1", api.account_id) == 1


async def test_marker_left_by_a_failed_removal_lapses(
    migrated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publish refused, and Redis failing just when its marker is to be removed: the marker
    lapses at the end of that request's time, and the intent never reads as accepted."""
    settings = make_settings(publish_timeout_s=1.0, db_timeout_s=1.0, request_timeout_s=3.0,
                             idempotency_lock_ms=4000)
    async with stack(settings) as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd", payment_method="pm_card_visa")
        intent_id = created.body["id"]
        path = f"/v1/payment_intents/{intent_id}"
        await api.wait_for(intent_id, ["requires_confirmation"])

        async def refused(self: CommandPublisher, command: Any, **kw: Any) -> None:
            raise PublishFailed("refused by RabbitMQ", maybe_queued=False)

        async def failing(self: PendingCommands, *args: Any) -> None:
            raise RedisError("connection reset")

        monkeypatch.setattr(CommandPublisher, "publish", refused)
        monkeypatch.setattr(PendingCommands, "remove", failing)
        reply = await api.post(f"{path}/confirm")
        assert reply.status == 503 and reply.error["code"] == "service_unavailable"
        monkeypatch.undo()
        assert await s.redis.hlen(f"pending:{api.account_id}:{intent_id}") == 1
        async with asyncio.timeout(20):
            while (await api.get(path)).body["status"] == "processing":
                await asyncio.sleep(0.1)
        assert (await api.get(path)).body["status"] == "requires_confirmation"
        again = await api.post(f"{path}/confirm")
        assert again.status == 202, again.body
        assert (await api.wait_for(intent_id))["status"] == "succeeded"


async def test_a_loop_whose_body_swallows_a_cancellation_still_stops() -> None:
    """asyncio.wait_for on Python 3.11 (inside redis-py, for one) can lose a cancellation: the
    loop's body then runs on, and stop() must cancel it again rather than wait for ever."""
    swallowed = 0

    async def body(loop: Loop) -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed > 2:
                    raise
            loop.beat()

    loop = Loop("swallower", body, stale_after_s=5)
    loop.start()
    await asyncio.sleep(0.1)
    async with asyncio.timeout(10):
        await loop.stop()
    assert swallowed == 3
