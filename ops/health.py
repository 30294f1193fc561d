"""`/health` (the process runs) and `/ready` (it can do its work: its dependencies answer and
its background loops are alive), the same for every payonce process."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aio_pika
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from ops.loops import Loop

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readiness(
    *,
    db: Any,
    redis: aioredis.Redis | None,
    amqp: aio_pika.abc.AbstractRobustConnection,
    loops: Iterable[Loop] = (),
    publisher: Any = None,
) -> web.Response:
    """503 and the failing checks unless every dependency answers and every loop is alive;
    `redis=None` for a process that does not use Redis; `publisher`, the process's
    CommandPublisher (contracts/topology.py), when it has one."""
    checks: dict[str, str] = {}
    try:
        await db.fetchval("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = type(exc).__name__
    if redis is not None:
        try:
            await redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = type(exc).__name__
    checks["rabbitmq"] = "ok" if amqp.connected.is_set() else "disconnected"
    if publisher is not None:
        checks["rabbitmq_publisher"] = "ok" if publisher.ready else "unavailable"
    for loop in loops:
        checks[loop.name] = "ok" if loop.alive() else "stalled"
    ok = all(v == "ok" for v in checks.values())
    return web.Response(
        body=orjson.dumps({"status": "ok" if ok else "unavailable", "checks": checks}),
        status=200 if ok else 503, content_type="application/json")


async def serve(
    host: str, port: int, *, ready: Handler, metrics: Handler
) -> web.AppRunner:
    """`/health`, `/ready` and `/metrics` of a process that has no HTTP API of its own."""
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def metrics_response() -> web.Response:
    """The process's metrics; those of every worker together when it is one of several
    edge workers (ops/workers.py)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
