"""Webhook deliveries: durable tasks in Postgres, sent under a lease, settled in batches.

A delivery (webhook_deliveries, recorded by processor/webhook_intake.py) is due when it is
`pending` and its `next_attempt_at` has come. A dispatcher sends only deliveries it holds the
lease of (`locked_until`), with their attempt number (`attempts`, one more than any attempt
recorded), so several dispatchers never send one attempt twice. It takes them two ways:

- new ones, from its intake, which records them under its lease in the same statement
  (webhook_intake.INSERT_DELIVERIES): the usual path, with no claim at all;
- any other due delivery (a retry, one asked for again, one another dispatcher left, one the
  intake had no room for), from the claimer, which takes them from the due ones of its own
  deployment (`exchange`) with `FOR UPDATE SKIP LOCKED`.

Each delivery is POSTed once: the Event as the Events API renders it, signed afresh
(processor/signing.py), with the event id as `webhook-id` on every attempt. The result is
settled, together with others, in one statement (or one transaction, when it disables an
endpoint): the attempt is recorded in webhook_attempts, and the delivery becomes `succeeded`
(2xx), `failed` (a 410, or the last attempt failed), or stays `pending` with its next attempt
due after the next step of `webhook_retry_schedule_s` (with jitter; at least what a
`Retry-After` asked for, up to the schedule's last step), and its lease is released. A 410
disables the endpoint, and so does an unbroken run of failed attempts lasting
`webhook_disable_after_s` (`failing_since`): status `disabled`, `disabled_reason`, and a
`webhook_endpoint.disabled` event for the outbox relay, in the transaction of that settle.
Deliveries of an endpoint that is disabled or deleted end `failed` without being sent.

Order: one object's deliveries to one endpoint that a dispatcher holds form a chain, sent one
after the other in `event_seq` order, each once the one before it is settled (the settle also
tells whether the endpoint is still enabled: if not, the chain stops and gives back the rest).
The intake leaves a new delivery to the claimer while an earlier event of its object is due
for its endpoint and held by nobody or by another dispatcher, and the claimer takes an
object's deliveries only if the first of them is not under way; so one object's events reach
an endpoint in order, unless an earlier one is waiting for a retry (or, with more than
MAX_LOOK deliveries due at once, is further back in the line than the claim looks). A
delivery's lease covers the attempts before it in its chain.

Bounds: at most `webhook_concurrency` chains at once per dispatcher, and
`webhook_endpoint_concurrency` attempts under way per endpoint (a chain has one at most, and
a new chain starts only if the endpoint has a slot nobody waits for), so an endpoint that
hangs holds its own slots and no others. While an endpoint has deliveries
left to the claimer, its new ones are left there too, behind them.

A retry requested meanwhile (`POST /v1/events/{id}/retry` sets the delivery `pending` and due
now at any moment) is never lost: a settle changes the state and due time only where the due
time is still the one it claimed; otherwise it records its attempt, releases the lease and
leaves the delivery due, so it is sent again. A settle whose lease was lost (another
dispatcher took the delivery over) only records its attempt.

A dispatcher that stops gracefully gives back the leases of the deliveries it held and did
not send. One that dies mid-attempt (or before its settle commits) leaves the leases to
expire; any dispatcher then claims the delivery again, records the lost attempt as
interrupted, and sends it again: the receiver may get it twice, with the same `webhook-id`.
Scheduled retries are rows, so they survive restarts of every process and of RabbitMQ.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
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
# The settler, woken by an outcome, waits this long before it writes: the outcomes that come
# meanwhile go in the same batch. Below the full rate attempts end one at a time, and each
# batch costs a transaction whatever its size; a chain's next attempt waits for the write.
SETTLE_LINGER_S = 0.02
# The settler checks for work (and beats) at least this often.
CHECK_S = 1.0
# Jitter spreads the retries of many deliveries that failed together (an endpoint down).
JITTER = 0.1
GONE = 410
GONE_REASON = "The endpoint answered 410 Gone: it asked not to receive any more events."
FAILING_REASON = "Every delivery attempt failed for {days:g} days."

# Rows an attempt is claimed from; see the module's docstring. The look ahead is the due
# deliveries, oldest first, of live endpoints not at their bound here ($2: so a hanging
# endpoint's backlog does not fill it), attempts under way included. An object's deliveries to
# an endpoint go as a chain, in event order, and only if the first is not under way: that
# keeps one object's events in order without a per-row search. Each endpoint then gets at
# most its free slots in chains ($4, $5, $6), first places first, and the claim at most $7
# chains. A delivery's lease covers the attempts before it in its chain (`link`).
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
    SELECT h.endpoint_id, h.object_id, h.next_attempt_at, h.event_seq,
           row_number() OVER (PARTITION BY h.endpoint_id
                              ORDER BY h.next_attempt_at, h.event_seq) AS place
    FROM heads h
    WHERE h.locked_until IS NULL OR h.locked_until < now()
), chains AS (
    SELECT r.endpoint_id, r.object_id
    FROM ranked r
    LEFT JOIN unnest($4::text[], $5::int[]) AS busy (endpoint_id, running)
        ON busy.endpoint_id = r.endpoint_id
    WHERE r.place <= $6 - coalesce(busy.running, 0)
    ORDER BY r.next_attempt_at, r.event_seq
    LIMIT $7
), links AS (
    SELECT a.id, row_number() OVER (PARTITION BY a.endpoint_id, a.object_id
                                    ORDER BY a.event_seq) AS link
    FROM ahead a JOIN chains c USING (endpoint_id, object_id)
    WHERE a.locked_until IS NULL OR a.locked_until < now()
), picked AS (
    SELECT d.id, d.locked_until AS old_lock, l.link
    FROM links l
    JOIN webhook_deliveries d ON d.id = l.id
    WHERE d.state = 'pending' AND d.next_attempt_at <= now()
      AND (d.locked_until IS NULL OR d.locked_until < now())
    FOR UPDATE OF d SKIP LOCKED
), claimed AS (
    UPDATE webhook_deliveries d
    SET locked_until = now() + make_interval(secs => $8 * picked.link), updated_at = now(),
        attempts = 1 + GREATEST(d.attempts, (
            SELECT coalesce(max(a.attempt), 0) FROM webhook_attempts a
            WHERE a.delivery_id = d.id))
    FROM picked
    WHERE d.id = picked.id
    RETURNING d.id, d.account_id, d.endpoint_id, d.object_id, d.event_id, d.attempts,
              d.next_attempt_at, d.locked_until, d.event_seq, picked.old_lock, picked.link
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
       (SELECT count(*) FILTER (WHERE p.state = 'pending') FROM webhook_deliveries p
        WHERE p.event_id = c.event_id) AS pending_webhooks
FROM claimed c
JOIN webhook_endpoints e ON e.id = c.endpoint_id
JOIN events ev ON ev.id = c.event_id
ORDER BY c.endpoint_id, c.object_id, c.link
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
), recorded AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, created, status_code, latency_ms,
                                  error, next_attempt_at)
    SELECT s.id, s.attempt, s.started, s.status_code, s.latency_ms, s.error,
           CASE WHEN settled.id IS NULL THEN now() + make_interval(secs => s.delay_s)
                ELSE settled.next_attempt_at END
    FROM s LEFT JOIN settled ON settled.id = s.id
    ON CONFLICT (delivery_id, attempt) DO NOTHING
)
-- The batch's endpoints that may still be sent to: a chain goes on only to those.
SELECT e.id FROM webhook_endpoints e
WHERE e.id = ANY($11::text[]) AND e.status = 'enabled' AND e.deleted_at IS NULL
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
# Leases of deliveries held and never sent, given back.
RELEASE = """
UPDATE webhook_deliveries d
SET locked_until = NULL, attempts = d.attempts - 1, updated_at = now()
FROM unnest($1::text[], $2::timestamptz[]) AS u (id, lease)
WHERE d.id = u.id AND d.locked_until = u.lease AND d.state = 'pending'
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


@dataclass(frozen=True, slots=True)
class Taken:
    """A delivery this dispatcher holds the lease of, waiting in its chain."""

    row: Mapping[str, Any]
    # time.monotonic() after which its lease might run out during the attempt: not sent, it
    # is left to be claimed when the lease has run out.
    send_by: float


class Deliverer:
    """Claims due deliveries, sends them, settles them; see the module's docstring.

    Deliveries are sent in chains: the ones of one object to one endpoint that this
    dispatcher holds, one after the other in event order. A chain holds one of the
    dispatcher's slots while it lasts, and one of its endpoint's while it sends (not while the
    outcome is settled: a chain back from its settle waits its turn for one).
    """

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
        self._chains: dict[tuple[str, ...], deque[Taken]] = {}
        # Per endpoint: the slots held (by chains not waiting for a settle, and reserved),
        # and the chains back from a settle waiting for one, each handed the next slot freed.
        self._busy: dict[str, int] = {}
        self._slot_waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._reserved = 0
        # Deliveries claimed here and not yet settled: the intake chains later events of
        # their objects behind them instead of leaving those to a claim.
        self._held: dict[str, Mapping[str, Any]] = {}
        # Endpoints that may have due deliveries nobody holds: worth a claim when they have
        # a free slot.
        # (A dict for the time each was marked, so a claim clears only what it could see.)
        self._waiting: dict[str, int] = {}
        self._marks = 0
        self._claimed: set[str] = set()  # held deliveries that came from a claim
        # A chain's next delivery is sent once the one before it is settled: True if the
        # chain may go on (its endpoint is still enabled).
        self._waiters: dict[str, asyncio.Future[bool]] = {}
        self._unsent: list[Mapping[str, Any]] = []
        self._settles: list[Settled] = []
        self._wake = asyncio.Event()
        self._settle_wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._next_due = float("inf")
        self._sweep_at = 0.0
        self._stopping = False

    @property
    def lease_seconds(self) -> float:
        return self._lease_s

    def held(self) -> list[str]:
        return list(self._held)

    def wake(self) -> None:
        """Deliveries may be due that nobody holds: claim now rather than at the next sweep."""
        self._sweep_at = 0.0
        self._wake.set()

    # --- deliveries the intake takes -------------------------------------------------------

    def reserve(self, groups: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """For new deliveries, grouped by (endpoint, object) in event order: the place in its
        chain of the first delivery of each group this dispatcher sends itself (a group of an
        object with a chain here joins its end; any other takes a free slot, which stays
        reserved until `hand_off`). The rest are left to a claim."""
        places: dict[tuple[str, str], int] = {}
        cap = self._settings.webhook_endpoint_concurrency
        room = self._room()
        for key in groups:
            endpoint_id = key[0]
            chain = self._chains.get(key)
            if self._stopping:
                self._wait_for_claim(endpoint_id)
            elif chain is not None:
                places[key] = len(chain) + 2  # after the one under way and those queued
            elif (room > 0 and self._load(endpoint_id) < cap
                  and endpoint_id not in self._waiting):
                # Not while the endpoint may have deliveries left to a claim: those are
                # older, and go first.
                places[key] = 1
                room -= 1
                self._reserved += 1
                self._busy[endpoint_id] = self._busy.get(endpoint_id, 0) + 1
            else:
                self._wait_for_claim(endpoint_id)
        return places

    def hand_off(self, places: dict[tuple[str, str], int], rows: list[Mapping[str, Any]],
                 since: float) -> None:
        """The deliveries recorded under this dispatcher's lease (in event order) by a
        statement sent at `since` (time.monotonic()), sent in their chains; the reservations
        of `places` are released."""
        reserved = {key for key, place in places.items() if place == 1}
        self._reserved -= len(reserved)
        untaken = False
        for row in rows:
            if row["locked_until"] is None:
                untaken = True
                self._wait_for_claim(row["endpoint_id"])
                continue
            key = (row["endpoint_id"], row["object_id"])
            # A new chain takes the slot reserved for it.
            slot = key in reserved and key not in self._chains
            if slot:
                reserved.discard(key)
            self._enqueue(row, key, row["place"], since, has_slot=slot)
        for key in reserved:
            self._release_slot(key[0])
        if untaken:
            self.wake()

    def _room(self) -> int:
        return self._settings.webhook_concurrency - len(self._chains) - self._reserved

    def _enqueue(self, row: Mapping[str, Any], key: tuple[str, ...], place: int,
                 since: float, has_slot: bool = False) -> None:
        self._held[row["id"]] = row
        # Its lease, from a statement sent at `since`, must still cover the POST and the
        # settle's wait when it starts.
        s = self._settings
        send_by = since + self._lease_s * place - s.webhook_timeout_s - s.db_timeout_s
        chain = self._chains.get(key)
        if chain is not None:
            chain.append(Taken(row, send_by))
            return
        self._chains[key] = deque([Taken(row, send_by)])
        task = asyncio.create_task(self._run_chain(key, has_slot))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        metrics.IN_FLIGHT.set(len(self._chains))

    def _wait_for_claim(self, endpoint_id: str) -> None:
        self._marks += 1
        self._waiting[endpoint_id] = self._marks

    def _forget(self, delivery_id: str) -> None:
        """A delivery held here that will not be settled here: its lease runs out."""
        self._held.pop(delivery_id, None)
        self._claimed.discard(delivery_id)

    def _load(self, endpoint_id: str) -> int:
        """The endpoint's slots held, and wanted by chains waiting for one."""
        return self._busy.get(endpoint_id, 0) + len(self._slot_waiters.get(endpoint_id, ()))

    def _release_slot(self, endpoint_id: str) -> None:
        """A slot freed: handed to the first chain waiting for one, if any."""
        waiting = self._slot_waiters.get(endpoint_id)
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._slot_waiters.pop(endpoint_id, None)
        left = self._busy.get(endpoint_id, 1) - 1
        if left > 0:
            self._busy[endpoint_id] = left
        else:
            self._busy.pop(endpoint_id, None)

    async def _take_slot(self, endpoint_id: str) -> None:
        """A slot for a chain back from a settle: at once if one is free and nobody waits
        for one, else the next one freed."""
        cap = self._settings.webhook_endpoint_concurrency
        if self._load(endpoint_id) < cap:
            self._busy[endpoint_id] = self._busy.get(endpoint_id, 0) + 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.setdefault(endpoint_id, deque()).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot(endpoint_id)  # handed over as it was cancelled
            raise

    async def _run_chain(self, key: tuple[str, ...], holding: bool) -> None:
        """Sends a chain's deliveries one after the other, each once the one before it is
        settled; stops at an endpoint disabled or deleted meanwhile, and gives the rest back.
        `holding`: it starts with a slot reserved for it; else it takes one first (a claim's
        chains: slots may have gone while the claim ran)."""
        chain = self._chains[key]
        endpoint_id = key[0]
        delivery_id = None
        try:
            while chain and not self._stopping:
                taken = chain.popleft()
                delivery_id = taken.row["id"]
                if time.monotonic() > taken.send_by:
                    self._forget(delivery_id)
                    continue
                if not holding:
                    await self._take_slot(endpoint_id)
                    holding = True
                settled = asyncio.get_running_loop().create_future()
                self._waiters[delivery_id] = settled
                sent = await self._send(taken.row)
                if not sent:
                    self._waiters.pop(delivery_id, None)
                    continue
                # No request to the endpoint while the settle is written: the slot goes to
                # another chain meanwhile.
                self._release_slot(endpoint_id)
                holding = False
                if not await settled and chain:
                    await self._give_back([t.row for t in chain])
                    chain.clear()
        finally:
            # Cut off (the dispatcher stopping) before its settle came back: nobody waits.
            if delivery_id is not None:
                waiter = self._waiters.get(delivery_id)
                if waiter is not None and not waiter.done():
                    self._waiters.pop(delivery_id).cancel()
            self._unsent.extend(t.row for t in chain)
            del self._chains[key]
            if holding:
                self._release_slot(endpoint_id)
            metrics.IN_FLIGHT.set(len(self._chains))
            self._wake.set()

    # --- the claimer -----------------------------------------------------------------------

    async def claim_loop(self, loop: Loop) -> None:
        """The claimer's body (ops.loops.Loop). A claim runs at every sweep (deliveries due
        for a retry, asked for again, or left by a dispatcher that stopped), and between
        sweeps when an endpoint with deliveries nobody holds has a free slot."""
        abandon_at = 0.0
        while not self._stopping:
            now = time.monotonic()
            if now >= abandon_at:
                await self._abandon()
                abandon_at = now + self._settings.sweep_interval_s
            self._wake.clear()
            room = self._room()
            sweep = now >= self._sweep_at or now >= self._next_due
            if room > 0 and (sweep or self._worth_a_claim()):
                if sweep:
                    self._sweep_at = now + self._settings.sweep_interval_s
                    if now >= self._next_due:
                        self._next_due = float("inf")
                full = self._full()
                mark = self._marks
                claimed = await self._claim(room, full)
                loop.beat()
                if claimed == room:
                    continue  # more may be due
                # Every delivery of an endpoint with room was claimed, or waits behind an
                # earlier event of its object.
                for endpoint_id in [e for e, at in self._waiting.items()
                                    if at <= mark and e not in full]:
                    del self._waiting[endpoint_id]
            loop.beat()
            await self._idle(room)

    def _full(self) -> list[str]:
        cap = self._settings.webhook_endpoint_concurrency
        return [e for e in {*self._busy, *self._slot_waiters} if self._load(e) >= cap]

    def _worth_a_claim(self) -> bool:
        cap = self._settings.webhook_endpoint_concurrency
        return any(self._load(e) < cap for e in self._waiting)

    async def _idle(self, room: int) -> None:
        """Until a wake, or the next sweep; with no room, until a chain ends."""
        timeout = min(self._sweep_at, self._next_due) - time.monotonic()
        if room <= 0:
            timeout = self._settings.sweep_interval_s
        await wait(self._wake, max(timeout, 0.0))

    async def _abandon(self) -> None:
        status = await self._pool.execute(ABANDON, self._exchange)
        dropped = int(status.rsplit(" ", 1)[-1])
        if dropped:
            metrics.DELIVERIES.labels("abandoned").inc(dropped)
            log.info("deliveries of disabled or deleted endpoints failed without being sent",
                     extra={"ids": {"deliveries": dropped}})

    async def _claim(self, room: int, full: list[str]) -> int:
        s = self._settings
        busy = list({*self._busy, *self._slot_waiters})
        since = time.monotonic()
        rows = await self._pool.fetch(
            CLAIM, self._exchange, full,
            min(min(room, LOOK_SLOTS) * LOOK_AHEAD + len(self._held), MAX_LOOK), busy,
            [self._load(e) for e in busy], s.webhook_endpoint_concurrency, room, self._lease_s)
        chains: dict[tuple[str, str], tuple[str, ...]] = {}
        for row in rows:  # each chain's in order
            first = (row["endpoint_id"], row["object_id"])
            key = chains.get(first)
            if key is None:
                # A chain here already (the claim found it not under way): this one's leases
                # do not count its place in line, so it goes apart.
                key = first if first not in self._chains else (*first, row["id"])
                chains[first] = key
            self._claimed.add(row["id"])
            self._enqueue(row, key, row["link"], since)
        return len(chains)

    def _secret(self, endpoint_id: str) -> str:
        secret = self._secrets.get(endpoint_id)
        if secret is None:
            if len(self._secrets) > 10_000:
                self._secrets.clear()
            secret = ids.webhook_secret(self._settings.secret_bytes, endpoint_id)
            self._secrets[endpoint_id] = secret
        return secret

    async def _send(self, row: Mapping[str, Any]) -> bool:
        """POSTs one attempt; True once its outcome is in line to be settled."""
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
                return True
        except Exception:
            # A bug, not the receiver's doing (those are outcomes): the lease runs out and
            # the delivery is sent again.
            self._forget(row["id"])
            metrics.ATTEMPTS.labels("unexpected").inc()
            log.exception("delivery attempt crashed; it is resumed when its lease expires")
            return False


    # --- the settler -----------------------------------------------------------------------

    async def settle_loop(self, loop: Loop) -> None:
        """The settler's body (ops.loops.Loop): writes what the attempts got, in batches.
        A batch that cannot be written stays in hand and is written when the loop runs
        again."""
        while True:
            await wait(self._settle_wake, CHECK_S)
            if self._settles:
                await asyncio.sleep(SETTLE_LINGER_S)
            self._settle_wake.clear()
            while self._settles:
                batch = self._settles[:SETTLE_BATCH]
                going = await self._settle_isolating(batch)
                del self._settles[:len(batch)]
                self._after_settle(batch, going)
            self._settled.set()
            loop.beat()

    async def _settle_isolating(self, batch: list[Settled]) -> set[str]:
        """Settles the batch, one by one if it must; the deliveries whose chains may go on
        (settled, to an endpoint still enabled)."""
        try:
            live = await self._write(batch)
            return {one.delivery["id"] for one in batch if one.delivery["endpoint_id"] in live}
        except Exception as exc:
            if is_transient(exc):
                metrics.TRANSIENT_FAILURES.labels("settle").inc()
                raise
            log.warning("a batch of settles failed; writing them one by one",
                        extra={"ids": {"settles": len(batch), "error": repr(exc)}})
        going: set[str] = set()
        for one in batch:
            try:
                if one.delivery["endpoint_id"] in await self._write([one]):
                    going.add(one.delivery["id"])
            except Exception as exc:
                if is_transient(exc):
                    raise
                # Its lease runs out and the delivery is sent again.
                log.error("could not settle an attempt", extra={"ids": {
                    "delivery": one.delivery["id"], "error": repr(exc)}}, exc_info=True)
        return going

    async def _write(self, batch: list[Settled]) -> set[str]:
        """Settles the batch; the endpoints of the batch that are still enabled."""
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
            return {r["id"] for r in await self._pool.fetch(*settle)}
        async with self._pool.acquire() as conn, conn.transaction():
            live = {r["id"] for r in await conn.fetch(*settle)}
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
        return live - set(gone) - set(too_long)

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

    def _after_settle(self, batch: list[Settled], going: set[str]) -> None:
        now = time.time()
        for one in batch:
            delivery_id = one.delivery["id"]
            self._held.pop(delivery_id, None)
            waiter = self._waiters.pop(delivery_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(delivery_id in going)
            if delivery_id in self._claimed:
                # A later event of its object may have been left to a claim behind it.
                self._claimed.discard(delivery_id)
                self._wait_for_claim(one.delivery["endpoint_id"])
                self._wake.set()
            if one.finished:
                metrics.DELIVERIES.labels(one.finished).inc()
            if one.outcome.succeeded:
                metrics.DELIVERY_LAG.observe(max(0.0, now - one.delivery["created"].timestamp()))
            elif one.delay_s is not None:
                metrics.RETRIES_SCHEDULED.inc()
                self._next_due = min(self._next_due, time.monotonic() + one.delay_s)

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
        if self._unsent:
            unsent, self._unsent = self._unsent, []
            await self._give_back(unsent)

    async def _give_back(self, rows: list[Mapping[str, Any]]) -> None:
        """Leases of deliveries held and not sent, given back: any dispatcher may claim them
        now, not when their leases run out."""
        for row in rows:
            self._forget(row["id"])
        try:
            await self._pool.execute(RELEASE, [r["id"] for r in rows],
                                     [r["locked_until"] for r in rows])
        except Exception as exc:
            log.warning("could not give back the leases of deliveries not sent; they are "
                        "claimed when the leases run out", extra={"ids": {
                            "deliveries": len(rows), "error": repr(exc)}})


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
