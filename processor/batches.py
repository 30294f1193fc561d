"""Commands applied in batches: many commands of one partition in one Postgres transaction,
with set-based statements, instead of a transaction and a dozen round trips each.

The protocol, and why it keeps every guarantee of applying one command at a time
(processor/intents.py, which stays the reference and the fallback):

- collect: the partition consumer's KeyedRunner lets at most one command of an intent run at
  a time, so a batch holds at most one command per intent, and a later command of an intent
  waits for the batch that holds the earlier one to commit: per-intent order holds inside a
  batch and across batches. Only fresh deliveries are batched; a redelivered command (a
  suspect in a crash) is applied alone, as processor/consumer.py explains.
- apply: one transaction for the whole batch. The inbox rows go first (`ON CONFLICT DO
  NOTHING`, so a duplicate, redelivered or republished, is found out as in the single path);
  what each new command does is decided in Python from the rows locked `FOR UPDATE`, with the
  same transition table, so a command that would be rejected is rejected before anything of
  it is written, and needs no savepoint; then one multi-row statement per table.
- settle: each command's message is acked only after the commit. If the transaction fails
  because a dependency is unavailable, the whole batch is retried in place. If it fails for
  any other reason, one of its commands is at fault: the batch is dropped and each of its
  commands is applied alone, where a poison command is isolated (and dead-lettered after its
  own failures) without taking its neighbours with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

from contracts import ids, objects
from contracts.commands import (
    ApplyPSPResult,
    ApplyRefundResult,
    ClientCommand,
    Command,
    ConfirmIntent,
    CreateIntent,
    CreateRefund,
)
from contracts.enums import CaptureMethod, ChargeStatus, EventType, IntentStatus, TaskKind
from contracts.errors import PayonceError, ResourceMissing
from contracts.topology import Topology
from contracts.transitions import Action, next_status, state
from processor.intents import (
    FORGET_START,
    LOCK_INTENTS,
    Applied,
    Rows,
    event_values,
    missing_payment_method,
    outcome_events,
    psp_transition,
)
from processor.lifecycle import (
    CLIENT_COMMANDS,
    INSERT_TASKS,
    LOCK_CHARGES,
    SYSTEM_COMMANDS,
    Lifecycle,
    task_values,
)
from processor.refunds import Refunds

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

INSERT_INBOX = """
INSERT INTO inbox (account_id, idempotency_key, fingerprint, command, object_id, outcome,
                   request_id)
SELECT a, k, f, c, o, 'applied', r
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
     AS u(a, k, f, c, o, r)
ON CONFLICT (account_id, idempotency_key) DO NOTHING
RETURNING account_id, idempotency_key
"""
# Rejections are decided before anything of the command is written: only the inbox row
# records them.
REJECT_INBOX = """
UPDATE inbox i SET outcome = 'rejected', error = u.e
FROM unnest($1::text[], $2::text[], $3::jsonb[]) AS u(a, k, e)
WHERE i.account_id = u.a AND i.idempotency_key = u.k
"""
INSERT_INTENTS = """
INSERT INTO payment_intents (id, account_id, amount, currency, status, customer, description,
                             metadata, payment_method, created, capture_method)
SELECT i, a, amt, cur, st::payment_intent_status, cu, d, m, pm, to_timestamp(t), cm
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::jsonb[], $9::text[], $10::bigint[], $11::text[])
     AS u(i, a, amt, cur, st, cu, d, m, pm, t, cm)
RETURNING *
"""
START_ATTEMPTS = """
UPDATE payment_intents p
SET status = 'processing', payment_method = u.pm, capture_method = u.cm,
    last_payment_error = NULL, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[]) AS u(i, pm, cm)
WHERE p.id = u.i
RETURNING p.*
"""
# Claimed for this processor's runner as they are made (a lease of $12 s from this statement,
# not from the transaction's start; the first try): it starts them with the rows returned,
# without a claim of its own (processor/attempts.py).
INSERT_ATTEMPTS = """
INSERT INTO payment_attempts (id, account_id, payment_intent_id, charge_id, psp_key, amount,
                              currency, payment_method, request_id, commands_exchange, capture,
                              locked_until, tries)
SELECT *, clock_timestamp() + make_interval(secs => $12), 1
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
            $7::text[], $8::text[], $9::text[], $10::text[], $11::boolean[])
RETURNING *
"""
# Settles the attempts not settled yet; the ones missing from the answer are unknown or done.
# A settled attempt holds no lease.
# Locked in id order, as the runners' statements lock them (processor/attempts.py, ordered).
SETTLE_ATTEMPTS = """
UPDATE payment_attempts SET state = 'settled', locked_until = NULL, updated_at = now()
WHERE id IN (SELECT id FROM payment_attempts WHERE id = ANY($1::text[]) AND state <> 'settled'
             ORDER BY id FOR UPDATE)
RETURNING *
"""
# With the intent's customer and description, as Stripe copies them onto a charge.
INSERT_CHARGES = """
INSERT INTO charges (id, account_id, payment_intent_id, attempt_id, amount, amount_captured,
                     currency, status, payment_method, authorization_code, failure_code,
                     failure_message, decline_code, customer, description)
SELECT i, a, pi, at, amt, cap, cur, st::charge_status, pm, ac, fc, fm, dc, p.customer,
       p.description
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],
            $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
            $13::text[])
     AS u(i, a, pi, at, amt, cap, cur, st, pm, ac, fc, fm, dc)
JOIN payment_intents p ON p.id = u.pi
RETURNING *
"""
FINISH_INTENTS = """
UPDATE payment_intents p
SET status = u.s::payment_intent_status, amount_received = u.r, latest_charge = u.c,
    last_payment_error = u.e, amount_capturable = u.k, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::jsonb[], $6::bigint[])
     AS u(i, s, r, c, e, k)
WHERE p.id = u.i
RETURNING p.*
"""
# In the order given, so one intent's events keep their order in `seq`; one notification for
# the whole batch wakes the outbox relay at commit.
INSERT_EVENTS = """
WITH inserted AS (
    INSERT INTO events (id, account_id, type, object_id, data, previous_attributes, request_id,
                        idempotency_key, exchange)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[],
                         $6::jsonb[], $7::text[], $8::text[], $9::text[])
    ON CONFLICT (id) DO NOTHING
)
SELECT pg_notify('payonce_events', '')
"""


class Batch:
    """One batch's transaction: `apply(conn, commands)` gives each command its Applied."""

    def __init__(self, secret: bytes, topology: Topology, lease_s: float) -> None:
        self._secret = secret
        self._lease_s = lease_s
        self._events_exchange = topology.events
        self._commands_exchange = topology.commands
        self._lifecycle = Lifecycle(secret, topology.commands, self._event)
        self._refunds = Refunds(secret, topology)

    async def apply(self, conn: Any, commands: list[Command]) -> list[Applied]:
        """Each command's outcome, in order; the caller holds the transaction. One Batch per
        transaction: it gathers the transaction's events."""
        results: list[Applied | None] = [None] * len(commands)
        self._events = Rows(9)
        client = [(i, c) for i, c in enumerate(commands)
                  if isinstance(c, ClientCommand) and not isinstance(c, CreateRefund)]
        results_psp = [(i, c) for i, c in enumerate(commands) if isinstance(c, ApplyPSPResult)]
        system = [(i, c) for i, c in enumerate(commands) if isinstance(c, SYSTEM_COMMANDS)]
        # Refunds are decided one by one against their charge (processor/refunds.py), in this
        # transaction; their events join the batch's.
        for i, c in enumerate(commands):
            if isinstance(c, CreateRefund | ApplyRefundResult):
                results[i] = await self._refunds.apply(
                    conn, c, lambda values: self._events.add(*values))
        if client:
            for i, applied in await self._client(conn, [c for _, c in client]):
                results[client[i][0]] = applied
        if results_psp:
            for i, applied in await self._psp_results(conn, [c for _, c in results_psp]):
                results[results_psp[i][0]] = applied
        if system:
            for i, applied in await self._lifecycle.apply(conn, system, Rows(3)):
                results[i] = applied
        if self._events:
            await conn.execute(INSERT_EVENTS, *self._events.columns)
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    async def _client(self, conn: Any, commands: list[ClientCommand]) -> list[tuple[int, Applied]]:
        inbox = Rows(6)
        for c in commands:
            inbox.add(c.account_id, c.idempotency_key, c.fingerprint, c.TYPE, c.intent_id,
                      c.request_id)
        new = {(r["account_id"], r["idempotency_key"])
               for r in await conn.fetch(INSERT_INBOX, *inbox.columns)}
        done: list[tuple[int, Applied]] = []
        fresh: list[tuple[int, ClientCommand]] = []
        for i, c in enumerate(commands):
            if (c.account_id, c.idempotency_key) in new:
                fresh.append((i, c))
            else:
                # The single path also tells a same-key-other-request duplicate apart; the
                # outcome is the same (nothing more is done), so the batch does not ask.
                done.append((i, Applied("duplicate")))
        rejected = Rows(3)
        creates: list[tuple[int, ClientCommand]] = []
        for i, c in fresh:
            if isinstance(c, CreateIntent) and c.confirm and c.payment_method is None:
                # Refused whole, as the single path's savepoint refuses it: no intent either.
                exc = missing_payment_method()
                rejected.add(c.account_id, c.idempotency_key, exc.body()["error"])
                done.append((i, Applied("rejected", detail=exc.message)))
            elif isinstance(c, CreateIntent):
                creates.append((i, c))
        confirms = [(i, c) for i, c in fresh if isinstance(c, ConfirmIntent)]
        lifecycle = [(i, c) for i, c in fresh if isinstance(c, CLIENT_COMMANDS)]
        if lifecycle:
            done.extend(await self._lifecycle.apply(conn, lifecycle, rejected))
        rows: dict[str, Any] = {}
        if creates:
            intents = Rows(11)
            for _, c in creates:
                assert isinstance(c, CreateIntent)
                status = (IntentStatus.REQUIRES_CONFIRMATION if c.payment_method
                          else IntentStatus.REQUIRES_PAYMENT_METHOD)
                intents.add(c.intent_id, c.account_id, c.amount, c.currency, status.value,
                            c.customer, c.description, c.metadata, c.payment_method,
                            c.accepted_at, c.capture_method)
            for row in await conn.fetch(INSERT_INTENTS, *intents.columns):
                rows[row["id"]] = row
            for _, c in creates:
                self._event(c, EventType.INTENT_CREATED, rows[c.intent_id])
        if confirms:
            for row in await conn.fetch(LOCK_INTENTS, [c.intent_id for _, c in confirms]):
                rows[row["id"]] = row
        starts: list[tuple[int, ClientCommand, Any, str, str]] = []
        for i, c in [*creates, *confirms]:
            row = rows.get(c.intent_id)
            try:
                if isinstance(c, CreateIntent):
                    if not c.confirm:
                        done.append((i, Applied("applied")))
                        continue
                    payment_method = c.payment_method
                    assert payment_method is not None
                else:
                    assert isinstance(c, ConfirmIntent)
                    if row is None or row["account_id"] != c.account_id:
                        raise ResourceMissing(f"No such payment_intent: '{c.intent_id}'")
                    payment_method = c.payment_method or row["payment_method"]
                next_status(Action.CONFIRM, state(row))
                if payment_method is None:
                    raise missing_payment_method()
            except PayonceError as exc:
                rejected.add(c.account_id, c.idempotency_key, exc.body()["error"])
                done.append((i, Applied("rejected", detail=exc.message)))
                continue
            capture_method = (c.capture_method if isinstance(c, ConfirmIntent)
                              else None) or row["capture_method"]
            starts.append((i, c, row, payment_method, capture_method))
        if rejected:
            await conn.execute(REJECT_INBOX, *rejected.columns)
        if starts:
            done.extend(await self._start_attempts(conn, starts))
        return done

    async def _start_attempts(
        self, conn: Any, starts: list[tuple[int, ClientCommand, Any, str, str]]
    ) -> list[tuple[int, Applied]]:
        updated = {row["id"]: row for row in await conn.fetch(
            START_ATTEMPTS, [c.intent_id for _, c, _, _, _ in starts],
            [pm for _, _, _, pm, _ in starts], [cm for _, _, _, _, cm in starts])}
        attempts = Rows(11)
        done: list[tuple[int, Applied]] = []
        for i, c, row, payment_method, capture_method in starts:
            attempt_id = ids.attempt_id(self._secret, c.intent_id, c.idempotency_key)
            attempts.add(attempt_id, c.account_id, c.intent_id,
                         ids.charge_id(self._secret, attempt_id), f"payonce_{attempt_id}",
                         row["amount"], row["currency"], payment_method, c.request_id,
                         self._commands_exchange, capture_method != CaptureMethod.MANUAL)
            self._event(c, EventType.INTENT_PROCESSING, updated[c.intent_id],
                        previous={"status": row["status"]})
            done.append((i, Applied("applied")))
        claimed = {row["id"]: row for row in await conn.fetch(
            INSERT_ATTEMPTS, *attempts.columns, self._lease_s)}
        for (_, applied), attempt_id in zip(done, attempts.columns[0], strict=True):
            applied.attempts.append(claimed[attempt_id])
        return done

    async def _psp_results(
        self, conn: Any, results: list[ApplyPSPResult]
    ) -> list[tuple[int, Applied]]:
        settled = {a["id"]: a for a in await conn.fetch(
            SETTLE_ATTEMPTS, [r.attempt_id for r in results])}
        done: list[tuple[int, Applied]] = []
        live = [(i, r, settled[r.attempt_id]) for i, r in enumerate(results)
                if r.attempt_id in settled]
        for i, r in enumerate(results):
            if r.attempt_id not in settled:
                done.append((i, Applied("duplicate", detail="attempt already settled, or unknown")))
        if not live:
            return done
        intents = {row["id"]: row for row in await conn.fetch(
            LOCK_INTENTS, [a["payment_intent_id"] for _, _, a in live])}
        charges = Rows(13)
        for _, r, a in live:
            captured = a["amount"] if r.succeeded and r.captured else 0
            charges.add(a["charge_id"], r.account_id, a["payment_intent_id"], a["id"],
                        a["amount"], captured, a["currency"],
                        (ChargeStatus.SUCCEEDED if r.succeeded else ChargeStatus.FAILED).value,
                        a["payment_method"], r.authorization_code, r.failure_code,
                        r.failure_message, r.decline_code)
        charge_rows = {row["attempt_id"]: row for row in await conn.fetch(
            INSERT_CHARGES, *charges.columns)}
        finish = Rows(6)
        finished: list[tuple[int, ApplyPSPResult, Any, Any, Applied]] = []
        # Authorizations that came back to an intent canceled meanwhile: given back.
        give_back: list[tuple[ApplyPSPResult, Any, Any, Applied]] = []
        for i, r, a in live:
            row = intents[a["payment_intent_id"]]
            charge = charge_rows[a["id"]]
            status = psp_transition(r, row)
            if status is None:
                done.append((i, Applied("rejected", detail=f"intent is {row['status']}")))
                continue
            applied = Applied("applied", detail=status)
            if status is IntentStatus.CANCELED:
                finish.add(row["id"], status.value, row["amount_received"], charge["id"],
                           row["last_payment_error"], 0)
                if r.succeeded:
                    give_back.append((r, a, charge, applied))
            elif not r.succeeded:
                finish.add(row["id"], status.value, 0, charge["id"],
                           objects.payment_error(charge), 0)
            elif r.captured:
                finish.add(row["id"], status.value, row["amount"], charge["id"], None, 0)
            else:
                finish.add(row["id"], status.value, 0, charge["id"], None, row["amount"])
            finished.append((i, r, row, charge, applied))
        if give_back:
            await self._give_back(conn, give_back)
        if finish:
            updated = {u["id"]: u for u in await conn.fetch(FINISH_INTENTS, *finish.columns)}
            for i, r, row, charge, applied in finished:
                after = updated[row["id"]]
                self._event(r, outcome_events(r.succeeded)[0], charge,
                            rendered=objects.charge(charge))
                if after["status"] != IntentStatus.CANCELED:
                    self._event(r, result_event(r), after, previous={"status": row["status"]})
                done.append((i, applied))
        return done

    async def _give_back(self, conn: Any,
                         give_back: list[tuple[ApplyPSPResult, Any, Any, Applied]]) -> None:
        """Void the authorizations (reverse the captures) that came back to canceled intents:
        a cancel accepted while the intent was processing wins."""
        authorizations = {c["id"]: c for c in await conn.fetch(
            LOCK_CHARGES, [charge["id"] for _, _, charge, _ in give_back])}
        tasks = Rows(10)
        for r, a, charge, applied in give_back:
            kind = TaskKind.REVERSE if r.captured else TaskKind.VOID
            values = task_values(self._secret, r, kind, authorizations[charge["id"]],
                                 a["amount"], self._commands_exchange)
            tasks.add(*values)
            applied.tasks.append(values[0])
            applied.detail = f"canceled; {kind} asked"
        await conn.execute(INSERT_TASKS, *tasks.columns)

    def _event(self, command: Command, event_type: EventType, row: Any, *,
               previous: dict[str, Any] | None = None,
               rendered: dict[str, Any] | None = None) -> None:
        self._events.add(*event_values(self._secret, self._events_exchange, command,
                                       event_type, row, previous=previous, rendered=rendered))


def result_event(result: ApplyPSPResult) -> EventType:
    """The intent's event for an attempt's result that found it processing."""
    if result.succeeded and not result.captured:
        return EventType.INTENT_AMOUNT_CAPTURABLE_UPDATED
    return outcome_events(result.succeeded)[1]


class Intents:
    """Applies one command alone, as a batch of one, in a transaction of its own."""

    def __init__(self, pool: Any, secret: bytes, topology: Topology, lease_s: float) -> None:
        self._pool = pool
        self._secret = secret
        self._topology = topology
        self._lease_s = lease_s

    async def apply(self, command: Command, *, journal: tuple[str, str] | None = None) -> Applied:
        """Apply `command`; `journal` (queue, message id) names the record of its start that
        the transaction deletes (processor/consumer.py)."""
        async with self._pool.acquire() as conn, conn.transaction():
            if journal is not None:
                await conn.execute(FORGET_START, *journal)
            [applied] = await Batch(self._secret, self._topology, self._lease_s).apply(
                conn, [command])
            return applied


class Coalescer(Generic[K, V]):
    """Single-row calls made while one is under way run together, as one statement.

    `await coalescer(key, value)` queues a row and returns what `run` answered for its key
    (None when it returned nothing for it). The first call starts a flush at the next turn of
    the loop; calls arriving while a flush runs wait for the next one, so the rows per
    statement grow with the load and a lone call goes at once. If `run` raises, every call of
    that flush raises it, as the single statement would have.
    """

    def __init__(self, run: Callable[[list[tuple[K, Any]]], Awaitable[Mapping[K, V]]]) -> None:
        self._run = run
        self._pending: list[tuple[K, Any, asyncio.Future[V | None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def __call__(self, key: K, value: Any = None) -> V | None:
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._pending.append((key, value, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(0)  # let the calls of this turn of the loop join
                rows, self._pending = self._pending, []
                try:
                    answers = await self._run([(key, value) for key, value, _ in rows])
                except BaseException as exc:
                    for _, _, future in rows:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for key, _, future in rows:
                    if not future.done():
                        future.set_result(answers.get(key))
        finally:
            self._flushing = None
