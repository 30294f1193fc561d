"""The edge process: `create_app(settings)` builds the aiohttp app; every connection it uses
is opened and closed by a cleanup context."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
from aiohttp import web
from redis.exceptions import RedisError

from contracts.errors import (
    MethodNotAllowed,
    PayloadTooLarge,
    PayonceError,
    ResourceMissing,
    ServiceUnavailable,
)
from contracts.pending import PendingCommands
from contracts.topology import CommandPublisher, Topology, declare
from edge import (
    docs,
    events,
    intents,
    lifecycle,
    metrics,
    reads,
    refunds,
    timeline,
    webhook_endpoints,
)
from edge.accept import json_response
from edge.admission import Admission
from edge.auth import PUBLISHABLE_ROUTES, KeyCache, key_from_header
from edge.idempotency import IdempotencyStore
from edge.keys import (
    ACCOUNT_ID,
    ADMISSION,
    AMQP,
    DB,
    HEARTBEAT,
    IDEMPOTENCY,
    KEY_CACHE,
    KEY_KIND,
    PENDING,
    PUBLISHER,
    RATE_LIMITER,
    REDIS,
    REQUEST_ID,
    SETTINGS,
    WAITERS,
    WAITERS_LOOP,
)
from edge.ratelimit import RateLimiter, ratelimit_middleware
from edge.waiters import PING_S, StatusWaiters
from ops.cache import redis_client
from ops.health import health, metrics_response, readiness
from ops.logs import bound
from ops.loops import Loop
from ops.postgres import create_pool, is_transient
from ops.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: PayonceError, request_id: str) -> web.Response:
    return json_response(error.body(), status=error.status,
                         headers={**error.headers, "Request-Id": request_id})


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, Stripe-shaped errors for everything, one log line and metric per request."""
    # A client's own request id is echoed and sent on to the processor only when it is short
    # printable ASCII: anything else would break the response headers or the command encoding.
    request_id = request.headers.get("X-Request-Id", "")[:64]
    if not (request_id and request_id.isascii() and request_id.isprintable()):
        request_id = f"req_{secrets.token_hex(8)}"
    request[REQUEST_ID] = request_id
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    started = time.perf_counter()
    with bound(request_id=request_id):
        try:
            response = await handler(request)
            response.headers["Request-Id"] = request_id
        except PayonceError as exc:
            response = error_response(exc, request_id)
        except web.HTTPRequestEntityTooLarge:
            response = error_response(PayloadTooLarge(
                f"The request body is larger than {request.app[SETTINGS].max_body_bytes} bytes."),
                request_id)
        except web.HTTPNotFound:
            response = error_response(ResourceMissing(
                f"Unrecognized request URL ({request.method}: {request.path[:200]})."), request_id)
        except web.HTTPMethodNotAllowed as exc:
            response = error_response(MethodNotAllowed(
                f"{request.method} is not allowed on {request.path[:200]}.",
                headers={"Allow": ",".join(sorted(exc.allowed_methods))}), request_id)
        except Exception as exc:
            if is_transient(exc) or isinstance(exc, RedisError | OSError):
                # A read or a check before anything was published: nothing was done.
                metrics.DEPENDENCY_ERRORS.labels(
                    "redis" if isinstance(exc, RedisError) else "postgres").inc()
                log.error("dependency failure", extra={"ids": {"error": repr(exc)}})
                response = error_response(ServiceUnavailable(
                    "payonce could not reach one of its services; retry the request.",
                    headers={"Stripe-Should-Retry": "true"}), request_id)
            else:
                log.exception("unhandled error", exc_info=exc)
                response = error_response(PayonceError(
                    "An internal error occurred; it has been logged."), request_id)
        elapsed = time.perf_counter() - started
        metrics.REQUESTS.labels(route, request.method, str(response.status)).inc()
        metrics.LATENCY.labels(route, request.method).observe(elapsed)
        log.info("request", extra={"ids": {
            "method": request.method, "path": request.path, "status": response.status,
            "ms": round(elapsed * 1000, 1), "account": request.get(ACCOUNT_ID)}})
        return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        key = key_from_header(request.headers.get("Authorization"))
        resource = request.match_info.route.resource
        route = (request.method, resource.canonical if resource is not None else "")
        account_id, kind = await request.app[KEY_CACHE].account_for(
            request.app[DB], key, publishable_ok=route in PUBLISHABLE_ROUTES)
        request[ACCOUNT_ID] = account_id
        request[KEY_KIND] = kind
        with bound(account=account_id):
            return await handler(request)
    return await handler(request)


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    pool = await create_pool(settings.database_url, timeout_s=settings.db_timeout_s,
                             min_size=2, max_size=20)
    app[DB] = pool
    yield
    await pool.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = redis_client(settings)
    app[REDIS] = client
    store = IdempotencyStore(client, ttl_s=settings.idempotency_ttl_s,
                             lock_ms=settings.idempotency_lock_ms,
                             owner=f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}",
                             deployment=settings.amqp_prefix)
    app[IDEMPOTENCY] = store
    app[PENDING] = PendingCommands(client, ttl_s=settings.pending_ttl_s)
    if settings.rate_limit_per_s > 0:
        app[RATE_LIMITER] = RateLimiter(client, per_s=settings.rate_limit_per_s,
                                        burst=settings.rate_limit_burst)
    ttl_ms = int(settings.edge_heartbeat_s * 1000)

    async def heartbeat(loop: Loop) -> None:
        while True:
            await store.heartbeat(ttl_ms)
            loop.beat()
            await asyncio.sleep(settings.edge_heartbeat_s / 4)

    # Stale once a beat would have expired the liveness key: this edge's locks are then fair
    # game for other edges, and it should not take requests.
    app[HEARTBEAT] = Loop("edge_heartbeat", heartbeat, stale_after_s=settings.edge_heartbeat_s,
                          max_backoff_s=settings.edge_heartbeat_s / 4)
    app[HEARTBEAT].start()
    yield
    await app[HEARTBEAT].stop()
    try:
        await store.retire()
    except RedisError as exc:
        log.warning("could not retire this edge's liveness key", extra={"ids": {
            "error": repr(exc)}})
    await client.aclose()


async def waiters_ctx(app: web.Application) -> AsyncIterator[None]:
    """The long-polls' Redis subscription, one for the whole process."""
    settings = app[SETTINGS]
    hub = StatusWaiters(settings.redis_url, settings.amqp_prefix,
                        max_waiters=settings.longpoll_max_waiters, timeout_s=settings.db_timeout_s)
    app[WAITERS] = hub
    # Beats with every message, PONGs included: a PING goes out after PING_S of silence.
    app[WAITERS_LOOP] = Loop("edge_status_subscription", hub.run, stale_after_s=3 * PING_S,
                             max_backoff_s=2.0)
    app[WAITERS_LOOP].start()
    yield
    await app[WAITERS_LOOP].stop()


async def release_waiters(app: web.Application) -> None:
    app[WAITERS].release_all()


async def amqp_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    topology = Topology(settings.amqp_prefix, settings.partitions)
    connection = await aio_pika.connect_robust(settings.amqp_url, client_properties={
        "connection_name": "payonce-edge"})
    channel = await connection.channel(publisher_confirms=True)
    await declare(channel, topology)
    app[AMQP] = connection
    app[PUBLISHER] = CommandPublisher(channel, topology, settings.publish_timeout_s, connection)
    yield
    await connection.close()


async def ready(request: web.Request) -> web.Response:
    app = request.app
    return await readiness(db=app[DB], redis=app[REDIS], amqp=app[AMQP],
                           loops=[app[HEARTBEAT], app[WAITERS_LOOP]], publisher=app[PUBLISHER])


async def metrics_view(request: web.Request) -> web.Response:
    return await metrics_response()


def create_app(settings: Settings) -> web.Application:
    settings.secret_bytes  # noqa: B018  (fails early with a clear message when unset)
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware, ratelimit_middleware],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[KEY_CACHE] = KeyCache()
    app[ADMISSION] = Admission(settings.edge_max_posts)
    app.cleanup_ctx.extend([postgres_ctx, redis_ctx, waiters_ctx, amqp_ctx])
    app.on_shutdown.append(release_waiters)
    for resource in (intents, lifecycle, reads, timeline, events, webhook_endpoints,
                     refunds):
        app.router.add_routes(resource.routes)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics_view)
    # The API's description and its reference page: no API key needed (outside /v1).
    app.router.add_routes(docs.routes)
    return app
