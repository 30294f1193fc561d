"""The processor process: partition consumers, PSP attempts, the sweeper and the outbox relay,
plus `/health`, `/ready` and `/metrics` on their own port."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aio_pika
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from contracts.pending import PendingCommands
from contracts.topology import CommandPublisher, Topology, declare
from ops.postgres import create_pool
from ops.settings import Settings
from processor.attempts import AttemptRunner
from processor.consumer import PartitionConsumer
from processor.intents import Intents
from processor.outbox import OutboxRelay
from processor.psp import SimulatedPSP

log = logging.getLogger(__name__)


class Processor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tasks: list[asyncio.Task[None]] = []
        self._consumers: list[PartitionConsumer] = []
        self._closers: list[Any] = []
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        s = self.settings
        topology = Topology(s.amqp_prefix, s.partitions)
        pool = await create_pool(s.database_url, min_size=2, max_size=20)
        self._closers.append(pool.close)
        # The simulated PSP keeps its books with a pool of its own, as a separate system would.
        psp_pool = await create_pool(s.database_url, min_size=1, max_size=10)
        self._closers.append(psp_pool.close)
        redis = aioredis.from_url(s.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._closers.append(redis.aclose)
        connection = await aio_pika.connect_robust(
            s.amqp_url, client_properties={"connection_name": "payonce-processor"})
        self._closers.append(connection.close)
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, topology)
        publisher = CommandPublisher(channel, topology, s.publish_timeout_s)

        self._pool, self._redis, self._amqp = pool, redis, connection
        self.attempts = AttemptRunner(pool, SimulatedPSP(psp_pool, s), publisher, s,
                                      topology.commands)
        intents = Intents(pool, s.secret_bytes, topology)
        pending = PendingCommands(redis, ttl_s=s.pending_ttl_s)
        self.relay = OutboxRelay(s.database_url, connection, topology, s.sweep_interval_s)
        for partition in range(s.partitions):
            consumer = PartitionConsumer(connection, topology, partition, intents, pending,
                                         self.attempts.kick, s.prefetch)
            await consumer.start()
            self._consumers.append(consumer)
        self._tasks = [
            asyncio.create_task(self.attempts.sweep_forever()),
            asyncio.create_task(self.relay.run_forever()),
        ]
        await self._serve_health()
        log.info("processor started", extra={"ids": {"partitions": s.partitions}})

    async def _serve_health(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.processor_host,
                           self.settings.processor_metrics_port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, dumps=lambda o: orjson.dumps(o).decode())

    async def _ready(self, request: web.Request) -> web.Response:
        checks = {"rabbitmq": "closed" if self._amqp.is_closed else "ok"}
        try:
            await self._pool.fetchval("SELECT 1")
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = type(exc).__name__
        ok = all(v == "ok" for v in checks.values())
        return web.json_response({"status": "ok" if ok else "unavailable", "checks": checks},
                                 status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        """Graceful: stop taking commands, finish those in hand and the PSP calls under way,
        then close. Whatever is cut off is redelivered or resumed, never lost."""
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        log.info("processor stopping")
        await asyncio.gather(*(c.stop(self.settings.shutdown_grace_s) for c in self._consumers))
        await self.attempts.stop(max(deadline - time.monotonic(), 1.0))
        self.relay.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        for close in reversed(self._closers):
            try:
                await close()
            except Exception as exc:
                log.warning("close failed", extra={"ids": {"error": repr(exc)}})
        log.info("processor stopped")
