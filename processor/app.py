"""The processor process: partition consumers, PSP attempts and tasks, and background loops
(the attempt sweeper, the PSP task sweeper, the dead-letter watcher and, unless `payonce relay`
runs it apart, the outbox relay), plus `/health`, `/ready` and `/metrics` on their own port."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import aio_pika
from aiohttp import web

from contracts.pending import PendingCommands
from contracts.topology import CommandPublisher, Topology, declare
from ops.cache import redis_client
from ops.health import metrics_response, readiness, serve
from ops.loops import Loop
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
from processor.refund_tasks import RefundRunner, split_tasks
from processor.status import StatusFanout

log = logging.getLogger(__name__)

QUEUE_FOR_CONNECTION_S = 60.0
CLOSE_TIMEOUT_S = 5.0
# Far longer than any PSP call with its retries, far shorter than a person would wait.
STUCK_AFTER_S = 300
STUCK_INTENTS = """
SELECT count(*) FROM payment_intents
WHERE status = 'processing' AND updated_at < now() - make_interval(secs => $1)
"""


class Processor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumers: list[PartitionConsumer] = []
        self._loops: list[Loop] = []
        self._closers: list[Any] = []
        self._runner: web.AppRunner | None = None
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
        connection = await aio_pika.connect_robust(
            s.amqp_url, client_properties={"connection_name": "payonce-processor"})
        self._closers.append(connection.close)
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, topology)
        self._monitor = await connection.channel()
        publisher = CommandPublisher(channel, topology, s.publish_timeout_s)

        self._pool: Database = pool
        self._redis, self._amqp = redis, connection
        psp = SimulatedPSP(psp_pool, s)
        self.attempts = AttemptRunner(pool, psp, publisher, s, topology.commands)
        self.tasks = TaskRunner(pool, psp, publisher, s, topology.commands)
        self.refunds = RefundRunner(pool, psp, publisher, s, topology.commands)

        def kick(task_ids: list[str]) -> None:
            attempts, refunds = split_tasks(task_ids)
            self.attempts.kick(attempts)
            self.refunds.kick(refunds)

        intents = Intents(pool, s.secret_bytes, topology)
        pending = PendingCommands(redis, ttl_s=s.pending_ttl_s, notify_deployment=s.amqp_prefix)
        gate = Gate()
        for partition in range(s.partitions):
            consumer = PartitionConsumer(
                connection, topology, partition, intents, pending, kick,
                s.prefetch, pool, gate, batch=lambda: Batch(s.secret_bytes, topology),
                on_tasks=self.tasks.kick)
            await consumer.start()
            self._consumers.append(consumer)
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

    async def _serve_health(self) -> None:
        s = self.settings
        self._runner = await serve(s.processor_host, s.processor_metrics_port, ready=self._ready,
                                   metrics=self._metrics)
        self.port = self._runner.addresses[0][1]

    async def _ready(self, request: web.Request) -> web.Response:
        return await readiness(db=self._pool, redis=self._redis, amqp=self._amqp,
                               loops=self._loops)

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
        await asyncio.gather(*(c.stop(self.settings.shutdown_grace_s) for c in self._consumers))
        await asyncio.gather(self.attempts.stop(max(deadline - time.monotonic(), 1.0)),
                             self.tasks.stop(max(deadline - time.monotonic(), 1.0)),
                             self.refunds.stop(max(deadline - time.monotonic(), 1.0)))
        await asyncio.gather(*(loop.stop() for loop in self._loops))
        if self._runner is not None:
            await self._runner.cleanup()
        for close in reversed(self._closers):
            try:
                # A dependency that is down must not hold the process: it is going anyway.
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await close()
            except Exception as exc:
                log.warning("close failed", extra={"ids": {"error": repr(exc)}})
        log.info("processor stopped")
