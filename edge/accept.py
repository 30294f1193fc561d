"""The accept pipeline every POST goes through: claim the Idempotency-Key, run the request
once, publish its command with a broker confirm, store the answer for replays.

    admit (a bound on POSTs at once) -> claim (Redis SET NX) -> inbox check (Postgres, when
    Redis forgot) -> project the object -> pending marker -> publish + confirm -> finish
    (store the answer and mark the pending marker queued, one round trip)

Handlers (one module per resource) validate the parameters, compute the fingerprint and the
projected object, and hand the command to `idempotent` and `accept`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from contracts import objects
from contracts.commands import ClientCommand
from contracts.errors import (
    IdempotencyKeyInUse,
    IdempotencyMismatch,
    OutcomeUnknown,
    ServiceUnavailable,
)
from contracts.topology import PublishFailed
from edge import metrics
from edge.idempotency import Claim, IdempotencyStore, Queued, mismatch
from edge.keys import (
    ACCOUNT_ID,
    ADMISSION,
    ADMITTED,
    DB,
    DEADLINE,
    IDEMPOTENCY,
    MARKED,
    PENDING,
    PUBLISHER,
    PUBLISHING,
    QUEUED,
    SETTINGS,
)
from ops import failpoints
from ops.settings import LOCK_MARGIN_S

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
    request: web.Request, key: str, fp: str, execute: Callable[[], Awaitable[Outcome]],
    *, marks: tuple[str, dict[str, Any]] | None = None,
) -> web.Response:
    """Run `execute` once per (account, Idempotency-Key); replay its answer to retries.

    Only successful answers are stored: an error releases the key, so a corrected or later
    retry of the same request runs again (the processor's inbox still dedupes the command).
    An unknown outcome parks the key with its fingerprint instead (see edge/idempotency.py).
    `execute` gets `request_timeout_s` from the claim: the lock outlasts it, so a request
    never runs on after another has taken its key.

    `marks`: (intent id, object) of the command `execute` will `accept`, when it is known
    before the claim (a create's): a new claim writes its pending marker in the same round
    trip, and `accept` does not write it again. Removed here if `accept` never ran.
    """
    admitted = request.app[ADMISSION].enter()
    request[ADMITTED] = admitted
    try:
        return await _idempotent(request, key, fp, execute, marks)
    finally:
        admitted.leave()


async def _idempotent(
    request: web.Request, key: str, fp: str, execute: Callable[[], Awaitable[Outcome]],
    marks: tuple[str, dict[str, Any]] | None,
) -> web.Response:
    app = request.app
    store = app[IDEMPOTENCY]
    account_id = request[ACCOUNT_ID]
    loop = asyncio.get_running_loop()
    request[DEADLINE] = loop.time() + app[SETTINGS].request_timeout_s
    marker = None
    if marks is not None:
        marker = app[PENDING].marker(account_id, marks[0], key, marks[1],
                                     deadline_ns=_marker_deadline_ns(request))
    try:
        claimed = await store.claim(account_id, key, fp, marker)
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
    if claimed.how != "new":
        metrics.IDEMPOTENCY.labels(claimed.how).inc()
        log.info("idempotency key claimed again", extra={"ids": {"after": claimed.how}})
    if claimed.marked:
        assert marker is not None
        request[MARKED] = marker
    try:
        async with asyncio.timeout_at(request[DEADLINE]):
            outcome = await execute()
    except TimeoutError as exc:
        # Cut off by the deadline: during a publish the command may still be queued.
        if request.get(PUBLISHING):
            await _park(store, claimed, fp)
            metrics.PUBLISHES.labels("any", "unknown").inc()
            raise outcome_unknown(exc) from exc
        await _release(request, store, claimed)
        raise unavailable("deadline", exc) from exc
    except OutcomeUnknown:
        await _park(store, claimed, fp)
        raise
    except BaseException:
        await _release(request, store, claimed)
        raise
    finally:
        await _unmark(request)
    try:
        await store.finish(claimed, fp, outcome.status, outcome.body, request.get(QUEUED))
    except RedisError:
        # A queued command is applied whatever Redis says, and its 202 is the truth; until it
        # is applied, reads may show the intent without it.
        metrics.DEPENDENCY_ERRORS.labels("redis").inc()
        log.warning("could not store the response; a retry is answered from Postgres")
    metrics.IDEMPOTENCY.labels("new").inc()
    return web.Response(body=outcome.body, status=outcome.status,
                        content_type="application/json", headers=outcome.headers)


def _marker_deadline_ns(request: web.Request) -> int:
    """The Unix time a pending marker written now means nothing after unless its command was
    confirmed: the end of its request, and the lock's margin."""
    remaining = request[DEADLINE] - asyncio.get_running_loop().time()
    return time.time_ns() + int((remaining + LOCK_MARGIN_S) * 1e9)


async def _unmark(request: web.Request) -> None:
    """Removes the marker the claim wrote for a command `accept` never took up (the request
    failed before it, or was answered from Postgres)."""
    marker = request.pop(MARKED, None)
    if marker is None:
        return
    try:
        await request.app[PENDING].remove_marker(marker)
    except RedisError:
        log.warning("could not remove the pending marker of a command never published; it "
                    "lapses at the end of the request")


async def _release(request: web.Request, store: IdempotencyStore, claimed: Claim) -> None:
    try:
        await store.release(claimed)
    except RedisError:
        log.warning("could not release idempotency key; it frees itself when its lock expires")
    queued = request.get(QUEUED)
    if queued is not None:
        # The request failed after its command was queued: the command stands.
        try:
            await request.app[PENDING].confirm(queued.account_id, queued.intent_id, queued.key)
        except RedisError:
            log.warning("could not confirm the pending marker of a queued command")


async def _park(store: IdempotencyStore, claimed: Claim, fp: str) -> None:
    try:
        await store.park(claimed, fp)
    except RedisError:
        # The lock still names this request and expires by itself; a retry then runs again.
        log.warning("could not keep the fingerprint of a key whose outcome is unknown")
    metrics.IDEMPOTENCY.labels("unknown").inc()


def outcome_unknown(exc: BaseException) -> OutcomeUnknown:
    log.error("publish outcome unknown", extra={"ids": {"error": f"{type(exc).__name__}: {exc}"}})
    return OutcomeUnknown(
        "payonce could not confirm that the request was accepted; it may still be applied. "
        "Retry with the same Idempotency-Key and parameters to learn the outcome.",
        headers={"Stripe-Should-Retry": "true"})


def unavailable(dependency: str, exc: BaseException) -> ServiceUnavailable:
    log.error("dependency unavailable", extra={"ids": {"dependency": dependency,
                                                       "error": f"{type(exc).__name__}: {exc}"}})
    return ServiceUnavailable(
        "payonce could not reach one of its services; nothing was done. Retry with the same "
        "Idempotency-Key.", headers={"Stripe-Should-Retry": "true"})


async def applied_before(
    request: web.Request, key: str, fp: str, *, fetch: str = FETCH_INTENT,
    render: Callable[[Any], dict[str, Any]] | None = None,
) -> Outcome | None:
    """The answer for a key Postgres remembers and Redis forgot (flushed, or the edge died
    between publishing and storing): the object as it is now, marked as a replay. `fetch`
    reads the inbox row's object by (id, account), `render` turns it into the API's object;
    by default a PaymentIntent."""
    db = request.app[DB]
    row = await db.fetchrow(FETCH_INBOX, request[ACCOUNT_ID], key)
    if row is None:
        return None
    if row["fingerprint"] != fp:
        raise mismatch(key)
    found = await db.fetchrow(fetch, row["object_id"], request[ACCOUNT_ID])
    if found is None:
        return None
    metrics.IDEMPOTENCY.labels("replayed_from_postgres").inc()
    if render is None:
        body = orjson.dumps(objects.payment_intent(found, request.app[SETTINGS].secret_bytes))
    else:
        body = orjson.dumps(render(found))
    return Outcome(202, body, {"Idempotent-Replayed": "true"})


async def accept(
    request: web.Request, command: ClientCommand, projected: dict[str, Any]
) -> Outcome:
    """Record the command as pending, publish it and wait for RabbitMQ's confirm: a 202 is
    only ever answered for a command that is durably queued."""
    try:
        return await _accept(request, command, projected)
    finally:
        request[ADMITTED].leave()


async def _accept(
    request: web.Request, command: ClientCommand, projected: dict[str, Any]
) -> Outcome:
    app = request.app
    pending = app[PENDING]
    account_id, intent_id, key = command.account_id, command.intent_id, command.idempotency_key
    remaining = request[DEADLINE] - asyncio.get_running_loop().time()
    # Written with the claim (`idempotent`'s `marks`), or here.
    if request.pop(MARKED, None) is None:
        try:
            await pending.add(pending.marker(account_id, intent_id, key, projected,
                                             deadline_ns=_marker_deadline_ns(request)))
        except RedisError as exc:
            raise unavailable("redis", exc) from exc
    failpoints.hit("edge.before_publish")
    request[PUBLISHING] = True
    try:
        await app[PUBLISHER].publish(
            command, timeout_s=min(remaining, app[SETTINGS].publish_timeout_s))
    except PublishFailed as exc:
        metrics.PUBLISHES.labels(command.TYPE, "unknown" if exc.maybe_queued else "failed").inc()
        metrics.DEPENDENCY_ERRORS.labels("rabbitmq").inc()
        # No 202 follows, so the marker goes: a command that lands after all (an unknown
        # outcome) shows once it is applied.
        try:
            await pending.remove(account_id, intent_id, key)
        except RedisError:
            log.warning("could not remove the pending marker of an unconfirmed command; it "
                        "lapses at the end of the request")
        if exc.maybe_queued:
            raise outcome_unknown(exc) from exc
        raise unavailable("rabbitmq", exc) from exc
    except BaseException:
        # A bug, or the request cancelled: no 202 follows either.
        with contextlib.suppress(RedisError):
            await pending.remove(account_id, intent_id, key)
        raise
    request[PUBLISHING] = False
    metrics.PUBLISHES.labels(command.TYPE, "confirmed").inc()
    failpoints.hit("edge.after_publish")
    # The marker is confirmed with the stored answer, in one round trip (`idempotent`).
    request[QUEUED] = Queued(account_id, intent_id, key)
    log.info("command accepted", extra={"ids": {"command": command.TYPE,
                                                "message_id": command.message_id}})
    return Outcome(202, orjson.dumps(projected))
