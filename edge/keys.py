"""Typed keys for everything the edge app and its requests carry."""

from __future__ import annotations

from typing import Any

import aio_pika
import redis.asyncio as aioredis
from aiohttp import web

from contracts.pending import Marker, PendingCommands
from contracts.topology import CommandPublisher
from edge.admission import Admission, Admitted
from edge.auth import KeyCache
from edge.idempotency import IdempotencyStore, Queued
from edge.waiters import StatusWaiters
from ops.loops import Loop
from ops.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
DB: web.AppKey[Any] = web.AppKey("db")  # an asyncpg.Pool; asyncpg ships no type hints
REDIS = web.AppKey("redis", aioredis.Redis)
AMQP = web.AppKey("amqp", aio_pika.abc.AbstractRobustConnection)
PUBLISHER = web.AppKey("publisher", CommandPublisher)
IDEMPOTENCY = web.AppKey("idempotency", IdempotencyStore)
PENDING = web.AppKey("pending", PendingCommands)
ADMISSION = web.AppKey("admission", Admission)
KEY_CACHE = web.AppKey("key_cache", KeyCache)
HEARTBEAT = web.AppKey("heartbeat", Loop)
# Absent when rate limits are off.
RATE_LIMITER: web.AppKey[Any] = web.AppKey("rate_limiter")  # an edge.ratelimit.RateLimiter
WAITERS = web.AppKey("waiters", StatusWaiters)
WAITERS_LOOP = web.AppKey("waiters_loop", Loop)

# Per-request values, set by the middlewares.
REQUEST_ID = web.RequestKey("request_id", str)
ACCOUNT_ID = web.RequestKey("account_id", str)
# The API key's kind: edge/auth.py's SECRET or PUBLISHABLE.
KEY_KIND = web.RequestKey("key_kind", str)
# The event-loop time a POST must be over by (edge/accept.py), and whether it is publishing.
DEADLINE = web.RequestKey("deadline", float)
PUBLISHING = web.RequestKey("publishing", bool)
# The pending marker the claim of a POST's key wrote, until `accept` takes it up.
MARKED = web.RequestKey("marked", Marker)
# The command a POST's publish queued, whose pending marker is confirmed with its answer.
QUEUED = web.RequestKey("queued", Queued)
# The POST's place under the edge's bound (edge/admission.py).
ADMITTED = web.RequestKey("admitted", Admitted)
