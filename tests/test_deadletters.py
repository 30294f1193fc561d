"""A command that cannot be applied is dead-lettered, listed, and replayed once fixed."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika

from contracts import ids
from contracts.commands import CreateIntent
from contracts.topology import CommandPublisher, Topology
from edge.idempotency import fingerprint
from ops.deadletters import list_dead, replay_dead
from tests.conftest import stack


async def test_dead_letter_then_replay(migrated: None) -> None:
    async with stack() as s:
        settings = s.settings
        # An account that does not exist yet: the insert fails its foreign key every time.
        account_id = ids.random_id("acct", 24)
        key = str(uuid.uuid4())
        params = {"amount": 4200, "currency": "usd", "customer": None, "description": None,
                  "metadata": {}, "payment_method": "pm_card_visa", "confirm": True}
        command = CreateIntent(
            account_id=account_id, intent_id=ids.intent_id(settings.secret_bytes, account_id, key),
            request_id="req_test", accepted_at=int(time.time()), idempotency_key=key,
            fingerprint=fingerprint("POST", "/v1/payment_intents", params), **params)
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            topology = Topology(settings.amqp_prefix, settings.partitions)
            await CommandPublisher(channel, topology, 5).publish(command)

        async with asyncio.timeout(20):
            while not (dead := await list_dead(settings)):
                await asyncio.sleep(0.1)
        assert [d["message_id"] for d in dead] == [command.message_id]
        assert dead[0]["type"] == CreateIntent.TYPE
        assert dead[0]["intent"] == command.intent_id
        # Listing does not take the message away.
        assert len(await list_dead(settings)) == 1

        await s.db.execute("INSERT INTO accounts (id, name) VALUES ($1, 'late')", account_id)
        assert await replay_dead(settings, [command.message_id]) == [command.message_id]
        assert await list_dead(settings) == []
        async with asyncio.timeout(20):
            while True:
                status = await s.db.fetchval(
                    "SELECT status FROM payment_intents WHERE id = $1", command.intent_id)
                if status == "succeeded":
                    break
                await asyncio.sleep(0.1)
