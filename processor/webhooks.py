"""Webhook deliveries: durable tasks in Postgres, sent under a lease, settled in batches.

A delivery (webhook_deliveries, recorded by processor/webhook_intake.py) is due when it is
`pending` and its `next_attempt_at` has come. The claimer takes due deliveries of its own
deployment (`exchange`) with `FOR UPDATE SKIP LOCKED` and gives each a lease
(`locked_until`) and its attempt number (`attempts`, one more than any attempt recorded), so
several dispatchers never send one attempt twice. Each claimed delivery is POSTed once: the
Event as the Events API renders it, signed afresh (processor/signing.py), with the event id as
`webhook-id` on every attempt. The result is settled, together with others, in one
transaction: the attempt is recorded in webhook_attempts, and the delivery becomes
`succeeded` (2xx), `failed` (a 410, or the last attempt failed), or stays `pending` with its
next attempt due after the next step of `webhook_retry_schedule_s` (with jitter; at least
what a `Retry-After` asked for, up to the schedule's last step), and its lease is released.
A 410 disables the endpoint, and so does an unbroken run of failed attempts lasting
`webhook_disable_after_s` (`failing_since`): status `disabled`, `disabled_reason`, and a
`webhook_endpoint.disabled` event for the outbox relay, in the transaction of that settle.
Deliveries of an endpoint that is disabled or deleted end `failed` without being sent.

A retry requested meanwhile (`POST /v1/events/{id}/retry` sets the delivery `pending` and due
now at any moment) is never lost: a settle changes the state and due time only where the due
time is still the one it claimed; otherwise it records its attempt, releases the lease and
leaves the delivery due, so it is sent again. A settle whose lease was lost (another
dispatcher took the delivery over) only records its attempt.

A dispatcher that dies mid-attempt (or before its settle commits) leaves the lease to expire
(`webhook_timeout_s` plus the settle's database calls); any dispatcher then claims the
delivery again, records the lost attempt as interrupted, and sends it again: the receiver may
get it twice, with the same `webhook-id`. Scheduled retries are rows, so they survive restarts
of every process and of RabbitMQ.

Order: a delivery is not claimed while an earlier event of the same object is due for the same
endpoint (or being sent to it), so one object's events reach an endpoint in `event_seq` order,
unless an earlier one is waiting for a retry (or, with more than MAX_LOOK deliveries due at
once, is further back in the line than the claim looks). Bounds: at most `webhook_concurrency`
attempts at once per dispatcher, and `webhook_endpoint_concurrency` per endpoint, enforced in
the claim itself, so an endpoint that hangs holds its own slots and no others.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from contracts import ids, objects
from contracts.enums import EventType
from ops.logs import bound
from ops.loops import Loop
from ops.postgres import Database, is_transient
from ops.settings import Settings
from processor import webhook_metrics as metrics
from processor.intents import INSERT_EVENT
from processor.signing import signature_headers
from processor.webhook_client import MAX_ERROR_CHARS, Outcome, WebhookClient

log = logging.getLogger(__name__)

USER_AGENT = "payonce/0.1 (+webhooks)"
CONTENT_TYPE = "application/json; charset=utf-8"
# Due deliveries looked at per claim: those under way here, and a few per free slot, up to
# LOOK_SLOTS of them (some are passed over, to keep one object's events in order or an
# endpoint within its bound). A claim's cost grows with what it looks at, and a claim runs
# whenever an attempt ends.
LOOK_AHEAD = 4
LOOK_SLOTS = 64
MAX_LOOK = 5000
SETTLE_BATCH = 500
# The settler checks for work (and beats) at least this often.
CHECK_S = 1.0
# Jitter spreads the retries of many deliveries that failed together (an endpoint down).
JITTER = 0.1
GONE = 410
GONE_REASON = "The endpoint answered 410 Gone: it asked not to receive any more events."
FAILING_REASON = "Every delivery attempt failed for {days:g} days."

# Rows an attempt is claimed from; see the module's docstring. The look ahead is the due
# deliveries, oldest first, of live endpoints not at their bound here ($2: so a hanging
# endpoint's backlog does not fill it), attempts under way included. Of each object's
# deliveries to an endpoint only the first in event order may go, and only if it is not under
# way: that keeps one object's events in order without a per-row search. Each endpoint then
# gets at most its free slots ($4, $5, $6), first places first.
CLAIM = """
WITH ahead AS (
    SELECT d.id, d.endpoint_id, d.object_id, d.next_attempt_at, d.event_seq, d.locked_until
    FROM webhook_deliveries d
    JOIN webhook_endpoints e ON e.id = d.endpoint_id
    WHERE d.exchange = $1 AND d.state = 'pending' AND d.next_attempt_at <= now()
      AND e.status = 'enabled' AND e.deleted_at IS NULL
      AND d.endpoint_id <> ALL($2::text[])
    ORDER BY d.next_attempt_at, d.event_seq
    LIMIT $3
), heads AS (
    SELECT DISTINCT ON (endpoint_id, object_id) *
    FROM ahead
    ORDER BY endpoint_id, object_id, event_seq
), ranked AS (
    SELECT id, endpoint_id,
           row_number() OVER (PARTITION BY endpoint_id ORDER BY next_attempt_at, event_seq)
               AS place
    FROM heads
    WHERE locked_until IS NULL OR locked_until < now()
), picked AS (
    SELECT d.id, d.locked_until AS old_lock
    FROM ranked r
    JOIN webhook_deliveries d ON d.id = r.id
    LEFT JOIN unnest($4::text[], $5::int[]) AS busy (endpoint_id, running)
        ON busy.endpoint_id = r.endpoint_id
    WHERE r.place <= $6 - coalesce(busy.running, 0)
      AND d.state = 'pending' AND d.next_attempt_at <= now()
      AND (d.locked_until IS NULL OR d.locked_until < now())
    ORDER BY r.place
    LIMIT $7
    FOR UPDATE OF d SKIP LOCKED
), claimed AS (
    UPDATE webhook_deliveries d
    SET locked_until = now() + make_interval(secs => $8), updated_at = now(),
        attempts = 1 + GREATEST(d.attempts, (
            SELECT coalesce(max(a.attempt), 0) FROM webhook_attempts a
            WHERE a.delivery_id = d.id))
    FROM picked
    WHERE d.id = picked.id
    RETURNING d.id, d.account_id, d.endpoint_id, d.event_id, d.attempts, d.next_attempt_at,
              d.locked_until, picked.old_lock
), interrupted AS (
    -- The attempt before this one was claimed and never settled: its dispatcher died.
    INSERT INTO webhook_attempts (delivery_id, attempt, created, latency_ms, error,
                                  next_attempt_at)
    SELECT c.id, c.attempts - 1, c.old_lock - make_interval(secs => $8), 0,
           'interrupted: the dispatcher stopped before this attempt ended', now()
    FROM claimed c
    WHERE c.old_lock IS NOT NULL AND c.attempts > 1
    ON CONFLICT (delivery_id, attempt) DO NOTHING
)
SELECT c.*, e.url, ev.type, ev.created, ev.data, ev.previous_attributes, ev.request_id,
       ev.idempotency_key,
       (SELECT count(*) FROM webhook_deliveries p
        WHERE p.event_id = c.event_id AND p.state = 'pending') AS pending_webhooks
FROM claimed c
JOIN webhook_endpoints e ON e.id = c.endpoint_id
JOIN events ev ON ev.id = c.event_id
"""
# Settles a batch. The state and due time change only where the due time is still the one
# claimed (else a retry was requested meanwhile: the delivery stays due), and only under this
# settle's own lease (else another dispatcher holds it: the attempt is only recorded). A
# `failing_since` changes only where it must: set at an endpoint's first failure, cleared
# (or moved to a later failure) by a success.
SETTLE = """
WITH s AS (
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::int[],
                         $5::text[], $6::float8[], $7::int[], $8::int[], $9::text[],
                         $10::timestamptz[])
        AS s (id, lease, claimed_next, attempt, state, delay_s, status_code, latency_ms,
              error, started)
), settled AS (
    UPDATE webhook_deliveries d
    SET state = CASE WHEN d.next_attempt_at = s.claimed_next THEN s.state ELSE 'pending' END,
        next_attempt_at = CASE WHEN d.next_attempt_at = s.claimed_next
                               THEN now() + make_interval(secs => s.delay_s)
                               ELSE d.next_attempt_at END,
        locked_until = NULL, updated_at = now()
    FROM s
    WHERE d.id = s.id AND d.locked_until = s.lease
    RETURNING d.id, d.next_attempt_at
), health AS (
    UPDATE webhook_endpoints e
    SET failing_since = CASE WHEN h.reset THEN h.fail_since
                             ELSE coalesce(e.failing_since, h.fail_since) END
    FROM unnest($11::text[], $12::bool[], $13::timestamptz[]) AS h (endpoint_id, reset,
                                                                      fail_since)
    WHERE e.id = h.endpoint_id
      AND e.failing_since IS DISTINCT FROM (
          CASE WHEN h.reset THEN h.fail_since ELSE coalesce(e.failing_since, h.fail_since) END)
)
INSERT INTO webhook_attempts (delivery_id, attempt, created, status_code, latency_ms, error,
                              next_attempt_at)
SELECT s.id, s.attempt, s.started, s.status_code, s.latency_ms, s.error,
       CASE WHEN settled.id IS NULL THEN now() + make_interval(secs => s.delay_s)
            ELSE settled.next_attempt_at END
FROM s LEFT JOIN settled ON settled.id = s.id
ON CONFLICT (delivery_id, attempt) DO NOTHING
"""
# Run after SETTLE in its transaction, so it sees the `failing_since` just set.
FAILING_TOO_LONG = """
SELECT id FROM webhook_endpoints
WHERE id = ANY($1::text[]) AND status = 'enabled' AND deleted_at IS NULL
  AND failing_since <= now() - make_interval(secs => $2)
"""
DISABLE = """
UPDATE webhook_endpoints
SET status = 'disabled', disabled_reason = $2, updated_at = now()
WHERE id = ANY($1::text[]) AND status = 'enabled' AND deleted_at IS NULL
RETURNING *
"""
ABANDON = """
UPDATE webhook_deliveries d
SET state = 'failed', next_attempt_at = NULL, locked_until = NULL, updated_at = now()
FROM webhook_endpoints e
WHERE e.id = d.endpoint_id AND (e.status <> 'enabled' OR e.deleted_at IS NOT NULL)
  AND d.exchange = $1 AND d.state = 'pending' AND d.next_attempt_at <= now()
  AND (d.locked_until IS NULL OR d.locked_until < now())
"""
DUE = """
SELECT count(*) AS due, extract(epoch FROM now() - min(next_attempt_at)) AS oldest_s
FROM webhook_deliveries
WHERE exchange = $1 AND state = 'pending' AND next_attempt_at <= now()
"""


@dataclass(frozen=True, slots=True)
class Settled:
    """One attempt's outcome, and what it does to its delivery."""

    delivery: Mapping[str, Any]
    outcome: Outcome
    started: datetime
    state: str  # succeeded, failed, pending
    delay_s: float | None
    finished: str  # the delivery's outcome if it ends here (succeeded, failed, gone), or ""


def lease_s(settings: Settings) -> float:
    """An attempt's lease: the POST, then the settle's wait for a connection and its
    statement, with a second to spare. A live dispatcher never loses one it is sending."""
    return settings.webhook_timeout_s + 2 * settings.db_timeout_s + 1.0


def plan(settings: Settings, attempt: int, outcome: Outcome) -> tuple[str, float | None, str]:
    """(state, seconds to the next attempt, finished) after attempt number `attempt`."""
    if outcome.succeeded:
        return "succeeded", None, "succeeded"
    if outcome.status_code == GONE:
        return "failed", None, "gone"
    schedule = settings.webhook_retry_schedule_s
    if attempt > len(schedule):
        return "failed", None, "failed"
    delay = schedule[attempt - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    if outcome.retry_after_s is not None:
        delay = max(delay, min(outcome.retry_after_s, schedule[-1]))
    return "pending", delay, ""


class Deliverer:
    """Claims due deliveries, sends them, settles them; see the module's docstring."""

    def __init__(
        self, pool: Database, client: WebhookClient, settings: Settings, exchange: str
    ) -> None:
        self._pool = pool
        self._client = client
        self._settings = settings
        self._exchange = exchange
        self._lease_s = lease_s(settings)
        self._secrets: dict[str, str] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._busy: dict[str, int] = {}
        self._settles: list[Settled] = []
        self._wake = asyncio.Event()
        self._settle_wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._next_due = float("inf")
        self._stopping = False

    def wake(self) -> None:
        """New deliveries were recorded, or a slot or an object's turn came free."""
        self._wake.set()

    # --- the claimer -----------------------------------------------------------------------

    async def claim_loop(self, loop: Loop) -> None:
        """The claimer's body (ops.loops.Loop)."""
        abandon_at = 0.0
        while not self._stopping:
            if time.monotonic() >= abandon_at:
                await self._abandon()
                abandon_at = time.monotonic() + self._settings.sweep_interval_s
            self._wake.clear()
            room = self._settings.webhook_concurrency - len(self._running)
            claimed = await self._claim(room) if room > 0 else 0
            loop.beat()
            if room > 0 and claimed == room:
                continue  # more may be due
            await self._idle()

    async def _idle(self) -> None:
        timeout = min(self._settings.sweep_interval_s, self._next_due - time.monotonic())
        await wait(self._wake, max(timeout, 0.0))
        if self._next_due <= time.monotonic():
            self._next_due = float("inf")

    async def _abandon(self) -> None:
        status = await self._pool.execute(ABANDON, self._exchange)
        dropped = int(status.rsplit(" ", 1)[-1])
        if dropped:
            metrics.DELIVERIES.labels("abandoned").inc(dropped)
            log.info("deliveries of disabled or deleted endpoints failed without being sent",
                     extra={"ids": {"deliveries": dropped}})

    async def _claim(self, room: int) -> int:
        s = self._settings
        cap = s.webhook_endpoint_concurrency
        full = [e for e, n in self._busy.items() if n >= cap]
        busy = list(self._busy)
        rows = await self._pool.fetch(
            CLAIM, self._exchange, full,
            min(min(room, LOOK_SLOTS) * LOOK_AHEAD + len(self._running), MAX_LOOK), busy,
            [self._busy[e] for e in busy], cap, room, self._lease_s)
        for row in rows:
            self._busy[row["endpoint_id"]] = self._busy.get(row["endpoint_id"], 0) + 1
            task = asyncio.create_task(self._send(row))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        metrics.IN_FLIGHT.set(len(self._running))
        return len(rows)

    def _secret(self, endpoint_id: str) -> str:
        secret = self._secrets.get(endpoint_id)
        if secret is None:
            if len(self._secrets) > 10_000:
                self._secrets.clear()
            secret = ids.webhook_secret(self._settings.secret_bytes, endpoint_id)
            self._secrets[endpoint_id] = secret
        return secret

    async def _send(self, row: Mapping[str, Any]) -> None:
        endpoint_id = row["endpoint_id"]
        try:
            data = row["data"] or {}
            intent = data.get("payment_intent") or (
                data.get("id") if data.get("object") == "payment_intent" else None)
            # The request and intent ids of the edge's and the processor's lines, so one grep
            # follows a payment into its deliveries.
            with bound(request_id=row["request_id"], account=row["account_id"], intent=intent,
                       event=row["event_id"], delivery=row["id"], endpoint=endpoint_id):
                body = orjson.dumps(objects.event(
                    {**row, "id": row["event_id"]}, pending_webhooks=row["pending_webhooks"]))
                headers = {"Content-Type": CONTENT_TYPE, "User-Agent": USER_AGENT,
                           **signature_headers(self._secret(endpoint_id), row["event_id"], body)}
                started = datetime.now(UTC)
                outcome = await self._client.post(row["url"], body, headers)
                metrics.ATTEMPTS.labels(outcome.result).inc()
                metrics.ATTEMPT_SECONDS.observe(outcome.latency_s)
                state, delay, finished = plan(self._settings, row["attempts"], outcome)
                if not outcome.succeeded:
                    log.info("delivery attempt failed", extra={"ids": {
                        "attempt": row["attempts"], "result": outcome.result,
                        "status_code": outcome.status_code, "retry_in_s":
                        None if delay is None else round(delay, 2)}})
                self._settles.append(Settled(row, outcome, started, state, delay, finished))
                self._settle_wake.set()
        except Exception:
            # A bug, not the receiver's doing (those are outcomes): the lease runs out and
            # the delivery is sent again.
            metrics.ATTEMPTS.labels("unexpected").inc()
            log.exception("delivery attempt crashed; it is resumed when its lease expires")
        finally:
            left = self._busy.get(endpoint_id, 1) - 1
            if left > 0:
                self._busy[endpoint_id] = left
            else:
                self._busy.pop(endpoint_id, None)
            metrics.IN_FLIGHT.set(len(self._running) - 1)
            self._wake.set()

    # --- the settler -----------------------------------------------------------------------

    async def settle_loop(self, loop: Loop) -> None:
        """The settler's body (ops.loops.Loop): writes what the attempts got, in batches.
        A batch that cannot be written stays in hand and is written when the loop runs
        again."""
        while True:
            await wait(self._settle_wake, CHECK_S)
            self._settle_wake.clear()
            while self._settles:
                batch = self._settles[:SETTLE_BATCH]
                await self._settle_isolating(batch)
                del self._settles[:len(batch)]
                self._after_settle(batch)
            self._settled.set()
            loop.beat()

    async def _settle_isolating(self, batch: list[Settled]) -> None:
        try:
            await self._write(batch)
            return
        except Exception as exc:
            if is_transient(exc):
                metrics.TRANSIENT_FAILURES.labels("settle").inc()
                raise
            log.warning("a batch of settles failed; writing them one by one",
                        extra={"ids": {"settles": len(batch), "error": repr(exc)}})
        for one in batch:
            try:
                await self._write([one])
            except Exception as exc:
                if is_transient(exc):
                    raise
                # Its lease runs out and the delivery is sent again.
                log.error("could not settle an attempt", extra={"ids": {
                    "delivery": one.delivery["id"], "error": repr(exc)}}, exc_info=True)

    async def _write(self, batch: list[Settled]) -> None:
        cols: tuple[list[Any], ...] = tuple([] for _ in range(10))
        for one in batch:
            o = one.outcome
            error = o.error
            if error is None and not o.succeeded:
                error = f"HTTP {o.status_code}"
            values = (one.delivery["id"], one.delivery["locked_until"],
                      one.delivery["next_attempt_at"], one.delivery["attempts"], one.state,
                      one.delay_s, o.status_code, round(o.latency_s * 1000),
                      None if error is None else error[:MAX_ERROR_CHARS], one.started)
            for col, value in zip(cols, values, strict=True):
                col.append(value)
        health = _endpoint_health(batch)
        failing = [e for e, (reset, since) in health.items() if since is not None]
        gone = sorted({one.delivery["endpoint_id"] for one in batch if one.finished == "gone"})
        settle: tuple[Any, ...] = (SETTLE, *cols, list(health),
                                   [reset for reset, _ in health.values()],
                                   [since for _, since in health.values()])
        if not failing and not gone:
            # Nothing to disable: one statement, atomic alone, with no BEGIN and COMMIT
            # round trips around it (the usual batch, every attempt a success).
            await self._pool.execute(*settle)
            return
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(*settle)
            too_long: list[str] = []
            if failing:
                too_long = [r["id"] for r in await conn.fetch(
                    FAILING_TOO_LONG, failing, self._settings.webhook_disable_after_s)]
            if gone:
                await self._disable(conn, gone, GONE_REASON, "gone")
            if too_long:
                days = self._settings.webhook_disable_after_s / 86400
                await self._disable(conn, sorted(set(too_long) - set(gone)),
                                    FAILING_REASON.format(days=round(days, 3)), "failing")

    async def _disable(self, conn: Any, endpoint_ids: list[str], reason: str,
                       label: str) -> None:
        """Disable the endpoints, each with a webhook_endpoint.disabled event, in the
        caller's transaction."""
        if not endpoint_ids:
            return
        for row in await conn.fetch(DISABLE, endpoint_ids, reason):
            event_type = EventType.WEBHOOK_ENDPOINT_DISABLED
            # A new id for each time the endpoint is disabled, the same if this is retried.
            event_id = ids.event_id(self._settings.secret_bytes, row["id"], event_type,
                                    row["updated_at"].isoformat())
            await conn.execute(INSERT_EVENT, event_id, row["account_id"], event_type, row["id"],
                               objects.webhook_endpoint(row), {"status": "enabled"}, None, None,
                               self._exchange)
            metrics.ENDPOINTS_DISABLED.labels(label).inc()
            log.warning("webhook endpoint disabled", extra={"ids": {
                "account": row["account_id"], "endpoint": row["id"], "reason": label}})

    def _after_settle(self, batch: list[Settled]) -> None:
        now = time.time()
        for one in batch:
            if one.finished:
                metrics.DELIVERIES.labels(one.finished).inc()
            if one.outcome.succeeded:
                metrics.DELIVERY_LAG.observe(max(0.0, now - one.delivery["created"].timestamp()))
            elif one.delay_s is not None:
                metrics.RETRIES_SCHEDULED.inc()
                self._next_due = min(self._next_due, time.monotonic() + one.delay_s)
        # The next events of these objects may be claimed now.
        self._wake.set()

    # --- the rest --------------------------------------------------------------------------

    async def read_gauges(self) -> None:
        try:
            row = await self._pool.fetchrow(DUE, self._exchange)
            metrics.DUE_BACKLOG.set(row["due"])
            metrics.DUE_OLDEST.set(float(row["oldest_s"] or 0.0))
        except Exception as exc:
            log.warning("could not read the webhook backlog", extra={"ids": {"error": repr(exc)}})
            metrics.DUE_BACKLOG.set(float("nan"))
            metrics.DUE_OLDEST.set(float("nan"))

    async def stop(self, grace_s: float) -> None:
        """Stop claiming, let the attempts under way finish and their settles be written;
        whatever is cut off keeps its lease until it runs out, then is sent again."""
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + grace_s
        if self._running:
            _, pending = await asyncio.wait(list(self._running), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        while self._settles and time.monotonic() < deadline:
            self._settled.clear()
            self._settle_wake.set()
            await wait(self._settled, deadline - time.monotonic())


async def wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until the event is set or the time is up. Not asyncio.wait_for: on Python 3.11 it can
    swallow a cancellation that comes as the event is set, and a loop would never stop."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        pass


def _endpoint_health(batch: list[Settled]) -> dict[str, tuple[bool, datetime | None]]:
    """For each endpoint of the batch: (a success resets its run of failures, the first
    failure of the run it is in at the end of the batch, or None)."""
    health: dict[str, tuple[bool, datetime | None]] = {}
    for one in sorted(batch, key=lambda s: s.started):
        endpoint_id = one.delivery["endpoint_id"]
        reset, since = health.get(endpoint_id, (False, None))
        if one.outcome.succeeded:
            health[endpoint_id] = (True, None)
        elif since is None:
            health[endpoint_id] = (reset, one.started)
    return health
