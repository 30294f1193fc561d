"""`payonce relay`: the outbox relay as a process of its own, for processors that run with
PAYONCE_PROCESSOR_RELAY=false. Nothing is published until it runs; then every event is, and
it stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from contracts.topology import Topology
from ops import postgres
from ops.bench import histogram_quantiles
from ops.loops import Loop
from processor import outbox
from processor.outbox import OutboxRelay
from tests.conftest import Proc, free_port, make_settings, stack, start_proc
from tests.support import EventTap, unpublished


async def test_events_wait_for_the_relay_process_then_all_leave(
        migrated: None, procs: list[Proc], tmp_path: Path) -> None:
    settings = make_settings(processor_relay=False, relay_metrics_port=free_port())
    async with stack(settings) as s, EventTap(settings).bound() as tap:
        api = await s.client()
        created = await api.create(amount=1500, currency="usd", payment_method="pm_card_visa",
                                   confirm="true")
        assert created.status == 202
        await api.wait_for(created.body["id"], {"succeeded"})
        rows = await s.db.fetch(
            "SELECT e.id, o.seq IS NOT NULL AS waiting FROM events e "
            "LEFT JOIN events_outbox o ON o.seq = e.seq WHERE e.account_id = $1",
            api.account_id)
        assert len(rows) == 4
        # The processor runs no relay: its events stay in the outbox.
        assert all(r["waiting"] for r in rows)
        assert s.processor is not None
        ready = await s.session.get(f"http://127.0.0.1:{s.processor.port}/ready")
        assert "outbox_relay" not in (await ready.json())["checks"]

        relay = await start_proc("relay", settings, procs, tmp_path)
        await tap.receive({r["id"] for r in rows})
        # Marked once RabbitMQ confirmed them, just after they reached the tap.
        deadline = time.monotonic() + 20
        while await unpublished(s.db, api.account_id):
            assert time.monotonic() < deadline, "events published but never marked"
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{settings.relay_metrics_port}"
            async with session.get(f"{url}/ready") as resp:
                body = await resp.json()
                assert resp.status == 200, body
                assert body["checks"] == {"postgres": "ok", "rabbitmq": "ok",
                                          "outbox_relay": "ok"}
            async with session.get(f"{url}/metrics") as resp:
                text = await resp.text()
                assert "payonce_processor_events_published_total 4.0" in text
                assert "payonce_processor_outbox_lag_seconds 0.0" in text
                # Each event's time from its write to RabbitMQ's confirm, for the lag's
                # quantiles: they waited for the relay to start, so none took under 5 ms.
                assert "payonce_processor_event_publish_seconds_count 4.0" in text
                assert 'payonce_processor_event_publish_seconds_bucket{le="0.005"} 0.0' in text
        lag = histogram_quantiles(text, "payonce_processor_event_publish_seconds", (0.5, 1.0))
        assert 0.005 <= lag[0] <= lag[1] <= 60
        assert await relay.sigterm(within_s=20) == 0


def test_the_lags_quantiles_are_read_off_the_histogram_as_prometheus_does() -> None:
    text = "\n".join([
        'x_bucket{le="0.5"} 0.0', 'x_bucket{le="1.0"} 10.0', 'x_bucket{le="2.0"} 20.0',
        'x_bucket{le="+Inf"} 20.0', "x_count 20.0", 'y_bucket{le="+Inf"} 0.0'])
    assert histogram_quantiles(text, "x", (0.25, 0.5, 0.75, 1.0)) == [0.75, 1.0, 1.5, 2.0]
    nothing = histogram_quantiles(text, "y", (0.5,))
    assert nothing[0] != nothing[0]  # NaN: no observation


class SlowBroker(OutboxRelay):
    """A broker that confirms at most CONFIRMS_IN_TIME publishes within the timeout."""

    CONFIRMS_IN_TIME = 25

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sizes: list[int] = []

    async def _publish(self, channel: Any, exchange: Any, rows: list[Any]) -> None:
        self.sizes.append(len(rows))
        if len(rows) > self.CONFIRMS_IN_TIME:
            raise TimeoutError
        await super()._publish(channel, exchange, rows)


async def test_a_broker_too_slow_for_a_whole_batch_still_gets_every_event(
        migrated: None) -> None:
    settings = make_settings(processor_relay=False)
    async with stack(settings) as s, EventTap(settings).bound() as tap:
        api = await s.client()
        made = await asyncio.gather(*(
            api.create(amount=1000 + i, currency="usd", payment_method="pm_card_visa",
                       confirm="true") for i in range(30)))
        for reply in made:
            await api.wait_for(reply.body["id"], {"succeeded"})
        events = {r["id"] for r in await s.db.fetch(
            "SELECT id FROM events WHERE account_id = $1", api.account_id)}
        assert len(events) == 120
        connection = await aio_pika.connect_robust(settings.amqp_url)
        relay = SlowBroker(settings.database_url, connection,
                           Topology(settings.amqp_prefix, settings.partitions),
                           settings.sweep_interval_s, settings.publish_timeout_s)
        loop = Loop("outbox_relay", relay.run, stale_after_s=30, max_backoff_s=0.1)
        loop.start()
        try:
            await tap.receive(events)
        finally:
            await loop.stop()
            await connection.close()
        # Halved until a batch went through (the rest of a round, read while the batch before
        # it was under way, may be smaller), then grown back slowly: most rounds go through.
        assert relay.sizes[0] == 120, relay.sizes
        halvings = iter(relay.sizes)
        assert all(size in halvings for size in (100, 50, 25)), relay.sizes
        after = relay.sizes[relay.sizes.index(25) + 1:]
        failed = [n for n in after if n > SlowBroker.CONFIRMS_IN_TIME]
        assert after and len(failed) < len(after) / 2, relay.sizes


NOTIFIED = "notified"


class Counted:
    """The relay's connection, counting the statements it sends and, among them, the
    notifications it hears (any processor's events notify, whatever their exchange)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.statements: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def add_listener(self, channel: str, callback: Any) -> None:
        def heard(*args: Any) -> None:
            self.statements.append(NOTIFIED)
            callback(*args)

        await self._conn.add_listener(channel, heard)

    async def fetch(self, sql: str, *args: Any) -> Any:
        self.statements.append(sql)
        return await self._conn.fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        self.statements.append(sql)
        return await self._conn.execute(sql, *args)


async def test_a_lone_event_costs_the_relay_two_statements(
        migrated: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Woken by one event, the relay reads it, publishes it and, once it is confirmed, marks
    it in the statement that looks for the next ones; nothing more while it is under way."""
    settings = make_settings(processor_relay=False)
    counted: list[Counted] = []

    async def connect(*args: Any, **kwargs: Any) -> Counted:
        counted.append(Counted(await postgres.connect(*args, **kwargs)))
        return counted[-1]

    async with stack(settings) as s, EventTap(settings).bound() as tap:
        api = await s.client()
        monkeypatch.setattr(outbox, "connect", connect)
        connection = await aio_pika.connect_robust(settings.amqp_url)
        # Idle for longer than the test: every read comes from a notification.
        relay = OutboxRelay(settings.database_url, connection,
                            Topology(settings.amqp_prefix, settings.partitions), 60.0,
                            settings.publish_timeout_s)
        loop = Loop("outbox_relay", relay.run, stale_after_s=120)
        loop.start()
        try:
            async with asyncio.timeout(10):
                while not (counted and counted[0].statements):
                    await asyncio.sleep(0.01)
            # The relay's first read found what earlier tests left, if anything; wait until
            # it is idle with an empty outbox.
            async with asyncio.timeout(20):
                while await s.db.fetchval("SELECT count(*) FROM events_outbox WHERE "
                                          "exchange = $1", relay._topology.events):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            before = len(counted[0].statements)
            created = await api.create(amount=1500, currency="usd")
            assert created.status == 202
            async with asyncio.timeout(20):
                while not (events := await s.db.fetch(
                        "SELECT id FROM events WHERE account_id = $1", api.account_id)):
                    await asyncio.sleep(0.02)
            await tap.receive({e["id"] for e in events})
            async with asyncio.timeout(20):
                while await unpublished(s.db, api.account_id):
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            statements = counted[0].statements[before:]
        finally:
            await loop.stop()
            await connection.close()
        assert len(counted) == 1, "the relay started over"
        assert set(statements) <= {outbox.UNPUBLISHED, NOTIFIED}, statements
        # One read finds the event and one marks it; any more only for a notification heard
        # meanwhile (another test's events, on this database).
        reads, heard = statements.count(outbox.UNPUBLISHED), statements.count(NOTIFIED)
        assert heard >= 1 and 2 <= reads <= 1 + heard, statements
