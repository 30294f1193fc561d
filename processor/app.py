"""The processor process: partition consumers, PSP attempts and tasks, and background loops
(the attempt sweeper, the PSP task sweeper, the dead-letter watcher and, unless `payonce relay`
runs it apart, the outbox relay), plus `/health`, `/ready` and `/metrics` on their own port.

Every processor consumes every partition queue; the broker gives each queue to one consumer
at a time (single active consumer) and keeps the others as standbys. One of several workers
(`payonce processor --workers N`, ops/workers.py) attaches to its own share of the partitions
first and to the rest a little later, so each queue's active consumer is the worker it belongs
to, while every worker stays a standby for the others."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aiohttp import web

from contracts.pending import PendingCommands
from contracts.topology import CommandPublisher, Topology, declare
from ops.cache import redis_client
from ops.health import metrics_response, readiness, serve
from ops.loops import Loop, close_all
from ops.postgres import Database, create_pool
from ops.settings import Settings
from processor import metrics
from processor.attempts import AttemptRunner
from processor.batches import Batch, Intents
from processor.consumer import Gate, PartitionConsumer
from processor.deadletters import DeadLetterWatcher
from processor.outbox import OutboxRelay, read_outbox_lag, stale_after_s
from processor.psp import SimulatedPSP
from processor.psp_tasks import TaskRunner
from processor.refund_tasks import RefundRunner
from processor.status import StatusFanout

log = logging.getLogger(__name__)

QUEUE_FOR_CONNECTION_S = 60.0
# A worker attaches to the other workers' partitions this long after its own: time for them
# to start and be first on theirs.
STANDBY_AFTER_S = 5.0
# Far longer than any PSP call with its retries, far shorter than a person would wait.
STUCK_AFTER_S = 300
STUCK_INTENTS = """
SELECT count(*) FROM payment_intents
WHERE status = 'processing' AND updated_at < now() - make_interval(secs => $1)
"""


def share(settings: Settings) -> tuple[list[int], list[int]]:
    """(the partitions this processor consumes first, those it stands by for): with
    `processor_workers` N, worker i is first on every partition p with p % N == i."""
    workers, me = settings.processor_workers, settings.processor_worker
    own = [p for p in range(settings.partitions) if p % workers == me]
    return own, [p for p in range(settings.partitions) if p % workers != me]


class Processor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumers: list[PartitionConsumer] = []
        self._standby: asyncio.Task[None] | None = None
        self._loops: list[Loop] = []
        self._closers: list[Any] = []
        self._runner: web.AppRunner | None = None
        self.publisher: CommandPublisher | None = None
        self.port: int | None = None

    async def start(self) -> None:
        s = self.settings
        topology = Topology(s.amqp_prefix, s.partitions)
        self._topology = topology
        # Hundreds of commands and PSP attempts share these connections: waiting in line for
        # one is the processor's backpressure, not a fault, so it gets far longer than a
        # statement (which the database timeout still bounds, so the line always moves).
        acquire_s = QUEUE_FOR_CONNECTION_S
        pool = await create_pool(s.database_url, timeout_s=s.db_timeout_s,
                                 acquire_timeout_s=acquire_s, min_size=2, max_size=20)
        self._closers.append(pool.close)
        # The simulated PSP keeps its books with a pool of its own, as a separate system would.
        psp_pool = await create_pool(s.database_url, timeout_s=s.db_timeout_s,
                                     acquire_timeout_s=acquire_s, min_size=1, max_size=10)
        self._closers.append(psp_pool.close)
        redis = redis_client(s)
        self._closers.append(redis.aclose)
        name = "payonce-processor" if s.processor_workers == 1 else \
            f"payonce-processor-{s.processor_worker}"
        connection = await aio_pika.connect_robust(
            s.amqp_url, client_properties={"connection_name": name})
        self._closers.append(connection.close)
        # Publishes on a connection of their own, as RabbitMQ advises: on the consumers' one,
        # the confirms of PSP results wait behind every delivery sent before them, and a
        # publisher in flow control would hold back the consumers' acks (measured under
        # `make bench`: most PSP results' confirms took over the 5 s publish timeout there).
        publishing = await aio_pika.connect_robust(
            s.amqp_url, client_properties={"connection_name": f"{name}-publisher"})
        self._closers.append(publishing.close)
        channel = await publishing.channel(publisher_confirms=True)
        await declare(channel, topology)
        self._monitor = await connection.channel()
        publisher = CommandPublisher(channel, topology, s.publish_timeout_s, publishing)

        self._pool: Database = pool
        self._redis, self._amqp, self.publisher = redis, connection, publisher
        psp = SimulatedPSP(psp_pool, s)
        self.attempts = AttemptRunner(pool, psp, publisher, s, topology.commands)
        self.tasks = TaskRunner(pool, psp, publisher, s, topology.commands)
        self.refunds = RefundRunner(pool, psp, publisher, s, topology.commands)

        def kick(claimed: list[Any]) -> None:
            self.attempts.kick((), claimed)

        intents = Intents(pool, s.secret_bytes, topology, s.psp_lease_s)
        pending = PendingCommands(redis, ttl_s=s.pending_ttl_s, notify_deployment=s.amqp_prefix)
        gate = Gate()

        async def consume(partition: int) -> None:
            consumer = PartitionConsumer(
                connection, topology, partition, intents, pending, kick, s.prefetch, pool, gate,
                batch=lambda: Batch(s.secret_bytes, topology, s.psp_lease_s),
                on_tasks=self.tasks.kick, on_refunds=self.refunds.kick)
            try:
                await consumer.start()
            except BaseException:
                await consumer.stop(0.0)
                raise
            self._consumers.append(consumer)

        own, others = share(s)
        for partition in own:
            await consume(partition)
        if others:
            self._standby = asyncio.create_task(self._stand_by(others, consume))
        watcher = DeadLetterWatcher(connection, topology, pending)
        fanout = StatusFanout(connection, redis, topology, s.amqp_prefix)
        stale_s = stale_after_s(s)
        self._loops = [
            Loop("attempt_sweeper", self.attempts.sweep, stale_after_s=stale_s),
            Loop("psp_task_sweeper", self.tasks.sweep, stale_after_s=stale_s),
            Loop("refund_sweeper", self.refunds.sweep, stale_after_s=stale_s),
            Loop("dead_letter_watcher", watcher.run, stale_after_s=stale_s),
            Loop("status_fanout", fanout.run, stale_after_s=stale_s),
        ]
        if s.processor_relay:
            relay = OutboxRelay(s.database_url, connection, topology, s.sweep_interval_s,
                                s.publish_timeout_s)
            self._loops.append(Loop("outbox_relay", relay.run, stale_after_s=stale_s))
        for loop in self._loops:
            loop.start()
        await self._serve_health()
        log.info("processor started", extra={"ids": {"partitions": s.partitions}})

    async def _stand_by(self, partitions: list[int],
                        consume: Callable[[int], Awaitable[None]]) -> None:
        """Consumes the other workers' partitions too, once they had the time to be first:
        the broker gives each queue to its first consumer and keeps the rest as standbys,
        which take over at once when it goes."""
        await asyncio.sleep(STANDBY_AFTER_S)
        for partition in partitions:
            while True:
                try:
                    await consume(partition)
                    break
                except Exception as exc:  # RabbitMQ away: its partitions have their own
                    log.warning("could not stand by for a partition; trying again",
                                extra={"ids": {"partition": partition, "error": repr(exc)}})
                    await asyncio.sleep(STANDBY_AFTER_S)
        log.info("standing by for the other workers' partitions",
                 extra={"ids": {"partitions": partitions}})

    async def _serve_health(self) -> None:
        s = self.settings
        port = s.processor_metrics_port + s.processor_worker if s.processor_metrics_port else 0
        self._runner = await serve(s.processor_host, port, ready=self._ready,
                                   metrics=self._metrics)
        self.port = self._runner.addresses[0][1]

    async def _ready(self, request: web.Request) -> web.Response:
        return await readiness(db=self._pool, redis=self._redis, amqp=self._amqp,
                               loops=self._loops, publisher=self.publisher)

    async def _metrics(self, request: web.Request) -> web.Response:
        await self._read_gauges()
        return await metrics_response()

    async def _read_gauges(self) -> None:
        """Gauges read from the source of truth at every scrape; NaN when it cannot be read."""
        timeout = self.settings.db_timeout_s
        await read_outbox_lag(self._pool, self._topology.events)
        try:
            metrics.INTENTS_STUCK.set(await self._pool.fetchval(STUCK_INTENTS, STUCK_AFTER_S))
        except Exception as exc:
            log.warning("could not count stuck intents", extra={"ids": {"error": repr(exc)}})
            metrics.INTENTS_STUCK.set(math.nan)
        try:
            async with asyncio.timeout(timeout):
                dead = await self._monitor.declare_queue(self._topology.dead, passive=True)
            metrics.DEAD_LETTER_DEPTH.set(dead.declaration_result.message_count or 0)
        except Exception as exc:
            log.warning("could not read the dead-letter queue's depth",
                        extra={"ids": {"error": repr(exc)}})
            metrics.DEAD_LETTER_DEPTH.set(math.nan)

    async def stop(self) -> None:
        """Graceful: stop taking commands, finish those in hand and the PSP calls under way,
        then close. Whatever is cut off is redelivered or resumed, never lost."""
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        log.info("processor stopping")
        if self._standby is not None:
            self._standby.cancel()
            await asyncio.gather(self._standby, return_exceptions=True)
        await asyncio.gather(*(c.stop(self.settings.shutdown_grace_s) for c in self._consumers))
        await asyncio.gather(self.attempts.stop(max(deadline - time.monotonic(), 1.0)),
                             self.tasks.stop(max(deadline - time.monotonic(), 1.0)),
                             self.refunds.stop(max(deadline - time.monotonic(), 1.0)))
        await asyncio.gather(*(loop.stop() for loop in self._loops))
        if self._runner is not None:
            await self._runner.cleanup()
        await close_all(self._closers)
        log.info("processor stopped")
