"""The webhook dispatcher process: the intake (processor/webhook_intake.py), the claimer and
the settler of deliveries (processor/webhooks.py), plus `/health`, `/ready` and `/metrics` on
`dispatcher_metrics_port`. Any number may run at once, against one database and broker."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika
from aiohttp import web

from contracts.topology import Topology, declare_events
from ops.health import metrics_response, readiness, serve
from ops.loops import Loop, close_all
from ops.postgres import Database, create_pool
from ops.settings import Settings
from processor.webhook_client import WebhookClient
from processor.webhook_intake import Intake
from processor.webhooks import Deliverer

log = logging.getLogger(__name__)

# The intake, the claimer, the settler and a scrape each hold at most one connection at once.
POOL_SIZE = 6
# Waiting for a pooled connection is the dispatcher's backpressure, not a fault.
QUEUE_FOR_CONNECTION_S = 60.0


class Dispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loops: list[Loop] = []
        self._closers: list[Any] = []
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        s = self.settings
        topology = Topology(s.amqp_prefix, s.partitions)
        pool = await create_pool(s.database_url, timeout_s=s.db_timeout_s,
                                 acquire_timeout_s=QUEUE_FOR_CONNECTION_S, min_size=2,
                                 max_size=POOL_SIZE)
        self._closers.append(pool.close)
        connection = await aio_pika.connect_robust(
            s.amqp_url, client_properties={"connection_name": "payonce-dispatcher"})
        self._closers.append(connection.close)
        channel = await connection.channel()
        await declare_events(channel, topology)
        await channel.close()
        client = WebhookClient(s)
        await client.start()
        self._closers.append(client.close)
        self._pool: Database = pool
        self._amqp = connection
        self.deliverer = Deliverer(pool, client, s, topology.events)
        intake = Intake(pool, connection, topology, s.secret_bytes, self.deliverer)
        # Stalled when no progress was shown for a few rounds, or for longer than a database
        # or broker call may take; the settler also waits on the database.
        stale_s = max(10 * s.sweep_interval_s, 3 * max(s.db_timeout_s, s.publish_timeout_s))
        self._loops = [
            Loop("webhook_intake", intake.run, stale_after_s=stale_s),
            Loop("webhook_claimer", self.deliverer.claim_loop, stale_after_s=stale_s),
            Loop("webhook_settler", self.deliverer.settle_loop, stale_after_s=stale_s),
        ]
        for loop in self._loops:
            loop.start()
        await self._serve_health()
        log.info("dispatcher started", extra={"ids": {
            "allow_private": s.webhook_allow_private, "concurrency": s.webhook_concurrency}})

    def loop(self, name: str) -> Loop:
        """One of its loops by name: webhook_intake, webhook_claimer, webhook_settler."""
        return next(loop for loop in self._loops if loop.name == name)

    async def _serve_health(self) -> None:
        s = self.settings
        self._runner = await serve(s.processor_host, s.dispatcher_metrics_port, ready=self._ready,
                                   metrics=self._metrics)
        self.port = self._runner.addresses[0][1]

    async def _ready(self, request: web.Request) -> web.Response:
        return await readiness(db=self._pool, redis=None, amqp=self._amqp, loops=self._loops)

    async def _metrics(self, request: web.Request) -> web.Response:
        await self.deliverer.read_gauges()
        return await metrics_response()

    async def stop(self) -> None:
        """Graceful: stop taking events (unacked ones go back to the queue) and claiming,
        finish the attempts under way and write their outcomes, then close."""
        log.info("dispatcher stopping")
        intake, claimer, settler = self._loops
        await asyncio.gather(intake.stop(), claimer.stop())
        await self.deliverer.stop(self.settings.shutdown_grace_s)
        await settler.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        await close_all(self._closers)
        log.info("dispatcher stopped")
