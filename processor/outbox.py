"""The outbox relay: publishes events, in commit order, to the events exchange.

Events are written in the transaction of the state change that causes them, naming the
exchange they go to. One relay per exchange holds an advisory lock and publishes them in `seq`
order, each with its stable id as the message id, then marks them published. A crash between
the broker's confirm and the mark publishes those events again (at least once); consumers
dedupe by id.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from typing import Any

import aio_pika
import orjson

from contracts import objects
from contracts.topology import Topology
from ops.postgres import connect
from processor import metrics
from processor.intents import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

BATCH = 200
UNPUBLISHED = """
SELECT * FROM events WHERE exchange = $1 AND published_at IS NULL ORDER BY seq LIMIT $2
"""
MARK_PUBLISHED = "UPDATE events SET published_at = now() WHERE seq = ANY($1::bigint[])"


class OutboxRelay:
    def __init__(
        self,
        database_url: str,
        connection: aio_pika.abc.AbstractRobustConnection,
        topology: Topology,
        idle_s: float,
    ) -> None:
        self._database_url = database_url
        self._amqp = connection
        self._topology = topology
        self._idle_s = idle_s
        self._wake = asyncio.Event()
        self._stopping = False

    async def run_forever(self) -> None:
        while not self._stopping:
            try:
                await self._run()
            except (*TRANSIENT_ERRORS, aio_pika.exceptions.AMQPError) as exc:  # type: ignore[misc]
                metrics.TRANSIENT_FAILURES.labels("outbox").inc()
                log.warning("outbox relay restarting", extra={"ids": {"error": repr(exc)}})
                await asyncio.sleep(1.0)

    async def _run(self) -> None:
        conn = await connect(self._database_url)
        channel = await self._amqp.channel(publisher_confirms=True)
        try:
            await conn.add_listener("payonce_events", lambda *_: self._wake.set())
            # One relay per exchange publishes, so events leave in commit order; others wait.
            lock = zlib.crc32(f"payonce.outbox:{self._topology.events}".encode())
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
                if await self._idle():
                    return
            exchange = await channel.get_exchange(self._topology.events)
            while not self._stopping:
                rows = await conn.fetch(UNPUBLISHED, self._topology.events, BATCH)
                oldest = rows[0]["created"].timestamp() if rows else time.time()
                metrics.OUTBOX_LAG.set(time.time() - oldest)
                if rows:
                    await self._publish(exchange, rows)
                    await conn.execute(MARK_PUBLISHED, [r["seq"] for r in rows])
                    metrics.EVENTS_PUBLISHED.inc(len(rows))
                    continue
                await self._idle()
        finally:
            await channel.close()
            await conn.close()

    async def _idle(self) -> bool:
        """Wait for new events or the poll interval; True once stopping."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=self._idle_s)
        except TimeoutError:
            pass
        self._wake.clear()
        return self._stopping

    async def _publish(self, exchange: aio_pika.abc.AbstractExchange, rows: list[Any]) -> None:
        # Publishes go out on the channel in call order; awaiting the confirms together
        # keeps that order while paying one round trip per batch, not per event.
        await asyncio.gather(*(
            exchange.publish(
                aio_pika.Message(
                    body=orjson.dumps(objects.event(row)),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=row["id"],
                    type=row["type"],
                    correlation_id=row["request_id"],
                    headers={"account_id": row["account_id"], "object_id": row["object_id"]},
                ),
                routing_key=row["type"],
                mandatory=False,
                timeout=30,
            )
            for row in rows
        ))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
