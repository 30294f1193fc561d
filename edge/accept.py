"""The accept pipeline every POST goes through: claim the Idempotency-Key, run the request
once, publish its command with a broker confirm, store the answer for replays.

    claim (Redis SET NX) -> inbox check (Postgres, when Redis forgot) -> project the object
    -> pending marker -> publish + confirm -> finish (store the answer)

Handlers (one module per resource) validate the parameters, compute the fingerprint and the
projected object, and hand the command to `idempotent` and `accept`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from contracts import objects
from contracts.commands import ClientCommand
from contracts.errors import IdempotencyKeyInUse, IdempotencyMismatch, ServiceUnavailable
from contracts.topology import PublishFailed
from edge import metrics
from edge.idempotency import Claim, mismatch
from edge.keys import ACCOUNT_ID, DB, IDEMPOTENCY, PENDING, PUBLISHER, SETTINGS
from ops import failpoints

log = logging.getLogger(__name__)

FETCH_INBOX = """
SELECT fingerprint, object_id FROM inbox WHERE account_id = $1 AND idempotency_key = $2
"""
FETCH_INTENT = "SELECT * FROM payment_intents WHERE id = $1 AND account_id = $2"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers
    )


async def idempotent(
    request: web.Request, key: str, fp: str, execute: Callable[[], Awaitable[Outcome]]
) -> web.Response:
    """Run `execute` once per (account, Idempotency-Key); replay its answer to retries.

    Only successful answers are stored: an error releases the key, so a corrected or later
    retry of the same request runs again (the processor's inbox still dedupes the command).
    """
    store = request.app[IDEMPOTENCY]
    account_id = request[ACCOUNT_ID]
    try:
        claimed = await store.claim(account_id, key, fp)
    except RedisError as exc:
        metrics.DEPENDENCY_ERRORS.labels("redis").inc()
        raise unavailable("redis", exc) from exc
    except IdempotencyMismatch:
        metrics.IDEMPOTENCY.labels("mismatch").inc()
        raise
    except IdempotencyKeyInUse:
        metrics.IDEMPOTENCY.labels("in_use").inc()
        raise
    if not isinstance(claimed, Claim):
        metrics.IDEMPOTENCY.labels("replayed").inc()
        return web.Response(body=claimed.body, status=claimed.status,
                            content_type="application/json",
                            headers={"Idempotent-Replayed": "true"})
    try:
        outcome = await execute()
    except BaseException:
        try:
            await store.release(claimed)
        except RedisError:
            log.warning("could not release idempotency key; it frees itself when its lock expires")
        raise
    try:
        await store.finish(claimed, fp, outcome.status, outcome.body)
    except RedisError:
        metrics.DEPENDENCY_ERRORS.labels("redis").inc()
        log.warning("could not store the response; a retry is answered from Postgres")
    metrics.IDEMPOTENCY.labels("new").inc()
    return web.Response(body=outcome.body, status=outcome.status,
                        content_type="application/json", headers=outcome.headers)


def unavailable(dependency: str, exc: BaseException) -> ServiceUnavailable:
    log.error("dependency unavailable", extra={"ids": {"dependency": dependency,
                                                       "error": f"{type(exc).__name__}: {exc}"}})
    return ServiceUnavailable(
        "payonce could not reach one of its services; nothing was done. Retry with the same "
        "Idempotency-Key.", headers={"Stripe-Should-Retry": "true"})


async def applied_before(request: web.Request, key: str, fp: str) -> Outcome | None:
    """The answer for a key Postgres remembers and Redis forgot (flushed, or the edge died
    between publishing and storing): the intent as it is now, marked as a replay."""
    db = request.app[DB]
    row = await db.fetchrow(FETCH_INBOX, request[ACCOUNT_ID], key)
    if row is None:
        return None
    if row["fingerprint"] != fp:
        raise mismatch(key)
    intent = await db.fetchrow(FETCH_INTENT, row["object_id"], request[ACCOUNT_ID])
    if intent is None:
        return None
    metrics.IDEMPOTENCY.labels("replayed_from_postgres").inc()
    body = orjson.dumps(objects.payment_intent(intent, request.app[SETTINGS].secret_bytes))
    return Outcome(202, body, {"Idempotent-Replayed": "true"})


async def accept(
    request: web.Request, command: ClientCommand, projected: dict[str, Any]
) -> Outcome:
    """Record the command as pending, publish it and wait for RabbitMQ's confirm: a 202 is
    only ever answered for a command that is durably queued."""
    app = request.app
    pending = app[PENDING]
    account_id, intent_id, key = command.account_id, command.intent_id, command.idempotency_key
    try:
        await pending.add(account_id, intent_id, key, projected)
    except RedisError as exc:
        raise unavailable("redis", exc) from exc
    try:
        await app[PUBLISHER].publish(command)
    except BaseException as exc:
        # Whatever stopped the publish, no 202 follows: a marker left behind would answer
        # 425 for an intent that may never exist, for the marker's whole lifetime.
        metrics.PUBLISHES.labels(command.TYPE, "failed").inc()
        try:
            await pending.remove(account_id, intent_id, key)
        except RedisError:
            log.warning("could not remove the pending marker of an unpublished command")
        if isinstance(exc, PublishFailed):
            raise unavailable("rabbitmq", exc) from exc
        raise
    metrics.PUBLISHES.labels(command.TYPE, "confirmed").inc()
    failpoints.hit("edge.after_publish")
    log.info("command accepted", extra={"ids": {"command": command.TYPE,
                                                "message_id": command.message_id}})
    return Outcome(202, orjson.dumps(projected))


