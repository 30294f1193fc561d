"""Commands applied to PaymentIntents, each in one Postgres transaction together with its inbox
row and its events, so a command takes effect exactly once however often it is delivered."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

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
from contracts.enums import ChargeStatus, EventType, IntentStatus
from contracts.errors import PayonceError, ResourceMissing, UnexpectedState
from contracts.topology import Topology
from contracts.transitions import Action, next_status

log = logging.getLogger(__name__)

FORGET_START = "DELETE FROM command_starts WHERE queue = $1 AND message_id = $2"
INSERT_INBOX = """
INSERT INTO inbox (account_id, idempotency_key, fingerprint, command, object_id, outcome,
                   request_id)
VALUES ($1, $2, $3, $4, $5, 'applied', $6)
ON CONFLICT (account_id, idempotency_key) DO NOTHING
RETURNING 1
"""
FETCH_INBOX_FINGERPRINT = """
SELECT fingerprint FROM inbox WHERE account_id = $1 AND idempotency_key = $2
"""
REJECT_INBOX = """
UPDATE inbox SET outcome = 'rejected', error = $3 WHERE account_id = $1 AND idempotency_key = $2
"""
INSERT_INTENT = """
INSERT INTO payment_intents (id, account_id, amount, currency, status, customer, description,
                             metadata, payment_method, created)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, to_timestamp($10))
RETURNING *
"""
LOCK_INTENT = "SELECT * FROM payment_intents WHERE id = $1 AND account_id = $2 FOR UPDATE"
START_ATTEMPT = """
UPDATE payment_intents
SET status = 'processing', payment_method = $2, last_payment_error = NULL, updated_at = now()
WHERE id = $1
RETURNING *
"""
INSERT_ATTEMPT = """
INSERT INTO payment_attempts (id, account_id, payment_intent_id, charge_id, psp_key, amount,
                              currency, payment_method, request_id, commands_exchange)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
"""
# Settles the attempt, or returns nothing when it is unknown or already settled.
SETTLE_ATTEMPT = """
UPDATE payment_attempts SET state = 'settled', updated_at = now()
WHERE id = $1 AND state <> 'settled'
RETURNING *
"""
INSERT_CHARGE = """
INSERT INTO charges (id, account_id, payment_intent_id, attempt_id, amount, amount_captured,
                     currency, status, payment_method, authorization_code, failure_code,
                     failure_message, decline_code)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
RETURNING *
"""
FINISH_INTENT = """
UPDATE payment_intents
SET status = $2, amount_received = $3, latest_charge = $4, last_payment_error = $5,
    updated_at = now()
WHERE id = $1
RETURNING *
"""
# The notification wakes the outbox relay; Postgres delivers it at commit, once per
# transaction however many events it holds.
INSERT_EVENT = """
WITH inserted AS (
    INSERT INTO events (id, account_id, type, object_id, data, previous_attributes, request_id,
                        idempotency_key, exchange)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    ON CONFLICT (id) DO NOTHING
)
SELECT pg_notify('payonce_events', '')
"""


@dataclass(slots=True)
class Applied:
    """What applying a command did, for the consumer to log, count and follow up on."""

    outcome: str  # applied, duplicate, rejected
    attempts: list[str] = field(default_factory=list)
    detail: str = ""


def missing_payment_method() -> UnexpectedState:
    return UnexpectedState("You cannot confirm this PaymentIntent because it's missing a "
                           "payment method.", param="payment_method")


def psp_transition(result: ApplyPSPResult, row: Any) -> IntentStatus | None:
    """Where a PSP result takes its intent, or None when the intent is no longer processing
    (logged: only a cancel moves an intent out of processing while its attempt runs)."""
    action = Action.PSP_SUCCEEDED if result.succeeded else Action.PSP_DECLINED
    try:
        return next_status(action, IntentStatus(row["status"]))
    except UnexpectedState:
        log.error("psp result for an intent no longer processing",
                  extra={"ids": {"intent": row["id"], "status": row["status"]}})
        return None


def outcome_events(succeeded: bool) -> tuple[EventType, EventType]:
    """(the charge's event, the intent's event) of a PSP result."""
    if succeeded:
        return EventType.CHARGE_SUCCEEDED, EventType.INTENT_SUCCEEDED
    return EventType.CHARGE_FAILED, EventType.INTENT_PAYMENT_FAILED


def event_values(
    secret: bytes, exchange: str, command: Command, event_type: EventType, row: Any, *,
    previous: dict[str, Any] | None = None, rendered: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """The columns of an events row (INSERT_EVENT's parameters), its id derived from the
    object, the type and the command, so a command applied again writes the same event."""
    obj = rendered or objects.payment_intent(row, secret)
    event_id = ids.event_id(secret, obj["id"], event_type, command.message_id)
    key = command.idempotency_key if isinstance(command, ClientCommand) else None
    return (event_id, command.account_id, event_type.value, obj["id"], obj, previous,
            command.request_id, key, exchange)


class Intents:
    def __init__(self, pool: Any, secret: bytes, topology: Topology) -> None:
        self._pool = pool
        self._secret = secret
        self._events_exchange = topology.events
        self._commands_exchange = topology.commands
        # Imported here: processor/refunds.py builds on this module.
        from processor.refunds import Refunds

        self._refunds = Refunds(secret, topology)

    async def apply(self, command: Command, *, journal: tuple[str, str] | None = None) -> Applied:
        """Apply `command` in one transaction; `journal` (queue, message id) names the record
        of its start that the transaction deletes (processor/consumer.py)."""
        async with self._pool.acquire() as conn, conn.transaction():
            if journal is not None:
                await conn.execute(FORGET_START, *journal)
            if isinstance(command, CreateRefund | ApplyRefundResult):
                return await self._apply_refund(conn, command)
            if isinstance(command, ClientCommand):
                return await self._apply_client(conn, command)
            assert isinstance(command, ApplyPSPResult)
            return await self._apply_psp_result(conn, command)

    async def _apply_refund(self, conn: Any, command: CreateRefund | ApplyRefundResult
                            ) -> Applied:
        events: list[tuple[Any, ...]] = []
        applied = await self._refunds.apply(conn, command, events.append)
        for values in events:
            await conn.execute(INSERT_EVENT, *values)
        return applied

    async def _apply_client(self, conn: Any, command: ClientCommand) -> Applied:
        first = await conn.fetchval(
            INSERT_INBOX, command.account_id, command.idempotency_key, command.fingerprint,
            command.TYPE, command.intent_id, command.request_id)
        if first is None:
            fingerprint = await conn.fetchval(
                FETCH_INBOX_FINGERPRINT, command.account_id, command.idempotency_key)
            if fingerprint != command.fingerprint:
                return Applied("duplicate", detail="same key, different request: ignored")
            return Applied("duplicate")
        # A rejection rolls back to this savepoint, keeping the inbox row that records it.
        try:
            async with conn.transaction():
                if isinstance(command, CreateIntent):
                    return await self._create(conn, command)
                assert isinstance(command, ConfirmIntent)
                return await self._confirm(conn, command)
        except PayonceError as exc:
            await conn.execute(REJECT_INBOX, command.account_id, command.idempotency_key,
                               exc.body()["error"])
            return Applied("rejected", detail=exc.message)

    async def _create(self, conn: Any, c: CreateIntent) -> Applied:
        status = (IntentStatus.REQUIRES_CONFIRMATION if c.payment_method
                  else IntentStatus.REQUIRES_PAYMENT_METHOD)
        row = await conn.fetchrow(
            INSERT_INTENT, c.intent_id, c.account_id, c.amount, c.currency, status, c.customer,
            c.description, c.metadata, c.payment_method, c.accepted_at)
        await self._event(conn, c, EventType.INTENT_CREATED, row)
        if c.confirm:
            return await self._start_attempt(conn, c, row, c.payment_method)
        return Applied("applied")

    async def _confirm(self, conn: Any, c: ConfirmIntent) -> Applied:
        row = await conn.fetchrow(LOCK_INTENT, c.intent_id, c.account_id)
        if row is None:
            raise ResourceMissing(f"No such payment_intent: '{c.intent_id}'")
        return await self._start_attempt(conn, c, row, c.payment_method or row["payment_method"])

    async def _start_attempt(
        self, conn: Any, c: ClientCommand, row: Any, payment_method: str | None
    ) -> Applied:
        next_status(Action.CONFIRM, IntentStatus(row["status"]))
        if payment_method is None:
            raise missing_payment_method()
        attempt_id = ids.attempt_id(self._secret, c.intent_id, c.idempotency_key)
        updated = await conn.fetchrow(START_ATTEMPT, c.intent_id, payment_method)
        await conn.execute(
            INSERT_ATTEMPT, attempt_id, c.account_id, c.intent_id,
            ids.charge_id(self._secret, attempt_id), f"payonce_{attempt_id}", row["amount"],
            row["currency"], payment_method, c.request_id, self._commands_exchange)
        await self._event(conn, c, EventType.INTENT_PROCESSING, updated,
                          previous={"status": row["status"]})
        return Applied("applied", attempts=[attempt_id])

    async def _apply_psp_result(self, conn: Any, r: ApplyPSPResult) -> Applied:
        attempt = await conn.fetchrow(SETTLE_ATTEMPT, r.attempt_id)
        if attempt is None:
            return Applied("duplicate", detail="attempt already settled, or unknown")
        row = await conn.fetchrow(LOCK_INTENT, attempt["payment_intent_id"], r.account_id)
        charge = await conn.fetchrow(
            INSERT_CHARGE, attempt["charge_id"], r.account_id, row["id"], attempt["id"],
            attempt["amount"], attempt["amount"] if r.succeeded else 0, attempt["currency"],
            ChargeStatus.SUCCEEDED if r.succeeded else ChargeStatus.FAILED,
            attempt["payment_method"], r.authorization_code, r.failure_code,
            r.failure_message, r.decline_code)
        status = psp_transition(r, row)
        if status is None:
            return Applied("rejected", detail=f"intent is {row['status']}")
        if r.succeeded:
            updated = await conn.fetchrow(FINISH_INTENT, row["id"], status, row["amount"],
                                          charge["id"], None)
        else:
            updated = await conn.fetchrow(FINISH_INTENT, row["id"], status, 0, charge["id"],
                                          objects.payment_error(charge))
        charge_event, intent_event = outcome_events(r.succeeded)
        await self._event(conn, r, charge_event, charge, rendered=objects.charge(charge))
        await self._event(conn, r, intent_event, updated, previous={"status": row["status"]})
        return Applied("applied", detail=status)

    async def _event(
        self,
        conn: Any,
        command: Command,
        event_type: EventType,
        row: Any,
        *,
        previous: dict[str, Any] | None = None,
        rendered: dict[str, Any] | None = None,
    ) -> None:
        await conn.execute(INSERT_EVENT, *event_values(
            self._secret, self._events_exchange, command, event_type, row, previous=previous,
            rendered=rendered))
