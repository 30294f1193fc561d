"""The outbox relay: publishes events, in commit order, to the events exchange.

Events are written in the transaction of the state change that causes them, naming the
exchange they go to. One relay per exchange holds an advisory lock and publishes them in `seq`
order, each with its stable id as the message id, in batches, then marks each batch published
once the broker confirmed it (its rows leave events_outbox, in the statement that reads the
next batch); it reads and sends the next batches while the broker confirms (up to IN_FLIGHT
at once), and reads again while batches are under way only when a read may find more (the
last one was full, or a new event was notified since it began). A crash between the broker's
confirm and the mark publishes those events again (at least once); consumers dedupe by id.

Events are published mandatory: the broker must route each one to at least one queue (the
webhook queue, declared in contracts/topology.py, always binds them all). An event that comes
back unrouted, or is refused, or is not confirmed in time, is not marked: the batch fails and
the relay's loop (ops.loops.Loop) runs again, with a new connection and channel, after a
backoff. So a broker or database restart only delays events, and the relay never stops.

A confirm says an event reached some queue, not which, and the status fan-out's queue takes
every event too. So before marking a batch the relay checks (passively) that the webhook
queue is still there: if an operator deleted it, the check fails, the loop starts over,
declares it again and publishes the batch again. An event routed to the queue before it was
deleted went with it, as any message in a deleted queue does.

The relay runs inside the processor (`Processor`), or alone (`RelayService`, `payonce relay`,
with `PAYONCE_PROCESSOR_RELAY=false` on the processors). Alone, it is a light process the
operating system schedules promptly however busy the processor is: a relay sharing the
processor's event loop waits its turn behind every command in hand, and events leave late
exactly when payments are many.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import zlib
from collections import deque
from typing import Any

import aio_pika
import aiormq
import orjson
from aiohttp import web
from pamqp.commands import Basic

from contracts import objects
from contracts.topology import (
    PERSISTENT,
    Topology,
    close_quietly,
    declare_events,
    opened_channel,
    publish_confirmed,
)
from ops.health import metrics_response, readiness, serve
from ops.loops import Loop, close_all
from ops.postgres import Database, connect, create_pool
from ops.settings import Settings
from processor import metrics

log = logging.getLogger(__name__)

BATCH = 200
# An idle relay woken by a new event waits this long before it reads: the events committed
# meanwhile go in the same batch. Below the full rate they come one transaction at a time, and
# every batch costs the same round trips (read, publish, confirm, then a read that marks it)
# whatever its size.
LINGER_S = 0.02
# Batches published and not yet confirmed at once: the next one is read and sent while the
# broker confirms the ones before it.
IN_FLIGHT = 4
# The events not published yet are the ones still in events_outbox (written with each event,
# ops/migrations/0014_events_outbox.sql), less those under way ($3). Not by a cursor on seq: an
# event whose transaction commits after a later seq was read must still be found. The events
# the broker confirmed since the last read ($4) leave the outbox in the same statement: one
# round trip where a mark and a read took two. The read sees the outbox as it was before the
# delete, so $3 names them too.
UNPUBLISHED = """
WITH published AS (
    DELETE FROM events_outbox WHERE exchange = $1 AND seq = ANY($4::bigint[])
)
SELECT e.* FROM events_outbox o JOIN events e ON e.seq = o.seq
WHERE o.exchange = $1 AND o.seq <> ALL($3::bigint[])
ORDER BY o.seq LIMIT $2
"""
OLDEST_UNPUBLISHED = """
SELECT extract(epoch FROM now() - e.created) FROM events_outbox o JOIN events e ON e.seq = o.seq
WHERE o.exchange = $1 ORDER BY o.seq LIMIT 1
"""


def stale_after_s(settings: Settings) -> float:
    """A loop is stalled when it has not shown progress for a few of its own rounds, or for
    longer than a database or broker call may take."""
    return max(10 * settings.sweep_interval_s,
               3 * max(settings.db_timeout_s, settings.publish_timeout_s))


async def read_outbox_lag(db: Database, events_exchange: str) -> None:
    """Sets the outbox-lag gauge from Postgres (NaN when it cannot be read)."""
    try:
        lag = await db.fetchval(OLDEST_UNPUBLISHED, events_exchange)
        metrics.OUTBOX_LAG.set(float(lag or 0.0))
    except Exception as exc:
        log.warning("could not read the outbox lag", extra={"ids": {"error": repr(exc)}})
        metrics.OUTBOX_LAG.set(math.nan)


class RelayError(Exception):
    """The broker did not take an event: it comes back in the next round."""


class OutboxRelay:
    def __init__(
        self,
        database_url: str,
        connection: aio_pika.abc.AbstractRobustConnection,
        topology: Topology,
        idle_s: float,
        timeout_s: float,
    ) -> None:
        self._database_url = database_url
        self._amqp = connection
        self._topology = topology
        self._idle_s = idle_s
        self._timeout_s = timeout_s
        self._wake = asyncio.Event()
        # Events per batch: BATCH, halved after a batch the broker did not confirm in time,
        # grown back by a quarter after each one it did. A broker too slow to confirm a whole
        # batch within the timeout (busy, or just restarted with a backlog) still sees the
        # relay make progress, in smaller batches, instead of the same batch timing out for
        # ever.
        self.batch = BATCH

    async def run(self, loop: Loop) -> None:
        """The relay's body: returns or raises only when it must start over."""
        conn = await connect(self._database_url, timeout_s=self._timeout_s)
        try:
            async with opened_channel(self._amqp, self._timeout_s) as channel:
                await self._relay(loop, conn, channel)
        finally:
            # Closing over a dead connection must not hang the loop.
            await close_quietly(lambda: conn.close(timeout=self._timeout_s), self._timeout_s)

    async def _relay(self, loop: Loop, conn: Any,
                     channel: aio_pika.abc.AbstractChannel) -> None:
        in_flight: deque[tuple[list[Any], asyncio.Task[None]]] = deque()
        try:
            await conn.add_listener("payonce_events", lambda *_: self._wake.set())
            # One relay per exchange publishes, so events leave in commit order; others wait.
            lock = zlib.crc32(f"payonce.outbox:{self._topology.events}".encode())
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock):
                loop.beat()
                await self._idle()
            # A queue deleted by an operator is declared again, so events are never unrouted.
            async with asyncio.timeout(self._timeout_s):
                await declare_events(channel, self._topology)
                exchange = await channel.get_exchange(self._topology.events)
            # Confirmed and not yet marked: they leave the outbox with the next read.
            confirmed_seqs: list[int] = []
            # Whether a read may find more: after a full batch, or a notification since the
            # last read began.
            more = True
            while True:
                if len(in_flight) < IN_FLIGHT and (more or confirmed_seqs
                                                   or self._wake.is_set()):
                    sent = [seq for rows, _ in in_flight for seq in (r["seq"] for r in rows)]
                    self._wake.clear()
                    rows = await conn.fetch(UNPUBLISHED, self._topology.events, self.batch,
                                            sent + confirmed_seqs, confirmed_seqs)
                    confirmed_seqs = []
                    loop.beat()
                    more = len(rows) == self.batch
                    if rows:
                        in_flight.append(
                            (rows, asyncio.create_task(self._publish(channel, exchange, rows))))
                    continue
                if not in_flight:
                    await self._idle()
                    more = True
                    continue
                # The oldest batch: confirmed, then marked; the others stay under way.
                rows, publishing = in_flight.popleft()
                try:
                    await publishing
                except TimeoutError:
                    self.batch = max(1, self.batch // 2)
                    raise
                confirmed = time.time()
                self.batch = min(BATCH, self.batch + max(1, self.batch // 4))
                # On the channel itself: a robust channel answers a passive declare of a
                # queue it declared before from its own memory, without asking the broker.
                underlay = await channel.get_underlay_channel()
                async with asyncio.timeout(self._timeout_s):
                    await underlay.queue_declare(self._topology.webhooks, passive=True)
                confirmed_seqs.extend(r["seq"] for r in rows)
                metrics.EVENTS_PUBLISHED.inc(len(rows))
                for row in rows:
                    metrics.EVENT_PUBLISH_SECONDS.observe(
                        max(0.0, confirmed - row["created"].timestamp()))
                loop.beat()
        finally:
            # Batches not confirmed are not marked: they go again in the next round.
            for _, publishing in in_flight:
                publishing.cancel()
            if in_flight:
                await asyncio.gather(*(p for _, p in in_flight), return_exceptions=True)

    async def _idle(self) -> None:
        """Wait for new events or the poll interval."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the event is set, and the relay would not stop at shutdown.
        try:
            async with asyncio.timeout(self._idle_s):
                await self._wake.wait()
        except TimeoutError:
            pass
        else:
            await asyncio.sleep(LINGER_S)
        self._wake.clear()

    async def _publish(self, channel: aio_pika.abc.AbstractChannel,
                       exchange: aio_pika.abc.AbstractExchange, rows: list[Any]) -> None:
        # Publishes go out on the channel in call order; awaiting the confirms together
        # keeps that order while paying one round trip per batch, not per event.
        confirmations = await asyncio.gather(*(
            publish_confirmed(
                channel, exchange.name, row["type"], orjson.dumps(objects.event(row)),
                aiormq.spec.Basic.Properties(
                    content_type="application/json",
                    delivery_mode=PERSISTENT,
                    message_id=row["id"],
                    message_type=row["type"],
                    correlation_id=row["request_id"],
                    headers={"account_id": row["account_id"], "object_id": row["object_id"]},
                ),
                timeout_s=self._timeout_s,
            )
            for row in rows
        ))
        unrouted = [row["id"] for row, c in zip(rows, confirmations, strict=True)
                    if not isinstance(c, Basic.Ack)]
        if unrouted:
            raise RelayError(f"{len(unrouted)} event(s) reached no queue, e.g. {unrouted[0]}")


class RelayService:
    """`payonce relay`: the outbox relay as a process of its own, with `/health`, `/ready` and
    `/metrics` on `relay_metrics_port`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._closers: list[Any] = []
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        s = self.settings
        self._topology = Topology(s.amqp_prefix, s.partitions)
        # For readiness and the lag gauge; the relay holds a connection of its own.
        self._pool: Database = await create_pool(
            s.database_url, timeout_s=s.db_timeout_s, acquire_timeout_s=s.db_timeout_s,
            min_size=1, max_size=2)
        self._closers.append(self._pool.close)
        self._amqp = await aio_pika.connect_robust(
            s.amqp_url, client_properties={"connection_name": "payonce-relay"})
        self._closers.append(self._amqp.close)
        relay = OutboxRelay(s.database_url, self._amqp, self._topology, s.sweep_interval_s,
                            s.publish_timeout_s)
        self.loop = Loop("outbox_relay", relay.run, stale_after_s=stale_after_s(s))
        self.loop.start()
        self._runner = await serve(s.processor_host, s.relay_metrics_port, ready=self._ready,
                                   metrics=self._metrics)
        self.port = self._runner.addresses[0][1]
        log.info("relay started", extra={"ids": {"exchange": self._topology.events}})

    async def _ready(self, request: web.Request) -> web.Response:
        return await readiness(db=self._pool, redis=None, amqp=self._amqp, loops=[self.loop])

    async def _metrics(self, request: web.Request) -> web.Response:
        await read_outbox_lag(self._pool, self._topology.events)
        return await metrics_response()

    async def stop(self) -> None:
        log.info("relay stopping")
        await self.loop.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        await close_all(self._closers)
        log.info("relay stopped")
