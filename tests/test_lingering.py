"""Below the full rate, work comes a little at a time. The outbox relay and the webhook
settler, woken by the first piece, wait a moment before they go to the database, so what comes
meanwhile shares their batch (processor/outbox.py LINGER_S, processor/webhooks.py
SETTLE_LINGER_S). Here the wait is made long, and payments come 200 ms apart: with it they
share batches, without it each goes alone."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest

from contracts.topology import Topology
from ops.loops import Loop
from processor import outbox, webhooks
from processor.outbox import OutboxRelay
from tests.conftest import make_settings, stack
from tests.support import VISA, EventTap, create, wait_settled
from tests.webhook_support import Receiver, add_endpoint, all_finished, eventually

LINGER_S = 2.0
PAYMENTS = 5
APART_S = 0.2


class CountingRelay(OutboxRelay):
    """The relay, noting the size of each batch it publishes."""

    sizes: list[int]

    async def _publish(self, channel: Any, exchange: Any, rows: list[Any]) -> None:
        self.sizes.append(len(rows))
        await super()._publish(channel, exchange, rows)


async def pay_apart(api: Any) -> list[str]:
    made = []
    for i in range(PAYMENTS):
        made.append(await create(api, 1000 + i, VISA, confirm_separately=False))
        await asyncio.sleep(APART_S)
    return made


@pytest.mark.parametrize("linger_s", [0.0, LINGER_S])
async def test_the_relay_publishes_events_written_while_it_waited_together(
        migrated: None, monkeypatch: pytest.MonkeyPatch, linger_s: float) -> None:
    monkeypatch.setattr(outbox, "LINGER_S", linger_s)
    settings = make_settings(processor_relay=False)
    async with stack(settings) as s, EventTap(settings).bound() as tap:
        api = await s.client()
        connection = await aio_pika.connect_robust(settings.amqp_url)
        relay = CountingRelay(settings.database_url, connection,
                              Topology(settings.amqp_prefix, settings.partitions),
                              settings.sweep_interval_s, settings.publish_timeout_s)
        relay.sizes = []
        loop = Loop("outbox_relay", relay.run, stale_after_s=30, max_backoff_s=0.1)
        loop.start()
        try:
            # Idle first: the payments' events are what wakes it.
            await asyncio.sleep(0.5)
            assert relay.sizes == []
            await pay_apart(api)
            await wait_settled(s.db, api.account_id, PAYMENTS)
            events = {r["id"] for r in await s.db.fetch(
                "SELECT id FROM events WHERE account_id = $1", api.account_id)}
            assert len(events) == 4 * PAYMENTS
            await tap.receive(events)
        finally:
            await loop.stop()
            await connection.close()
    assert sum(relay.sizes) == 4 * PAYMENTS, relay.sizes
    if linger_s:
        # The first wake's batch holds the events of every payment written in its wait.
        assert relay.sizes[0] >= 2 * PAYMENTS, relay.sizes
    else:
        # Each payment's events left before the next payment came.
        assert relay.sizes[0] <= 4, relay.sizes


@pytest.mark.parametrize("linger_s", [0.0, LINGER_S])
async def test_the_settler_writes_outcomes_that_came_while_it_waited_together(
        migrated: None, monkeypatch: pytest.MonkeyPatch, linger_s: float) -> None:
    monkeypatch.setattr(webhooks, "SETTLE_LINGER_S", linger_s)
    written: list[int] = []
    write = webhooks.Deliverer._write

    async def counting(self: webhooks.Deliverer, batch: list[webhooks.Settled]) -> set[str]:
        written.append(len(batch))
        return await write(self, batch)

    monkeypatch.setattr(webhooks.Deliverer, "_write", counting)
    receiver = await Receiver().start()
    try:
        async with stack(make_settings(), dispatcher=True) as s:
            api = await s.client()
            endpoint_id, _ = await add_endpoint(s.db, s.settings, api.account_id,
                                                receiver.url("hooks"),
                                                events=("payment_intent.created",))
            await pay_apart(api)
            await eventually(lambda: all_finished(s.db, endpoint_id, PAYMENTS),
                             "every payment_intent.created delivered and settled")
    finally:
        await receiver.stop()
    assert sum(written) == PAYMENTS, written
    if linger_s:
        assert written[0] >= 3, written
    else:
        assert written[0] == 1, written
