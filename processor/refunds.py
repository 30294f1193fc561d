"""Refund commands applied to their intent's charge: a new refund (CreateRefund) and the PSP's
answer for one (ApplyRefundResult), on the intent's partition.

Both come in the order the partition delivers them, one command of an intent at a time, so
the refunds of one charge are decided one after another against its `amount_refunded` (under
the charge's row lock as well). A refund is reserved against the charge when it is created,
pending: `amount_refunded` never exceeds `amount_captured` (a CHECK in Postgres), and a refund
that would take it beyond is recorded `failed` with EXCEEDS_CAPTURED and never reaches the
PSP. A refund that fails later gives its amount back.

Everything a command does is decided before anything of it is written, so a rejection (the
intent or charge gone, the intent not succeeded) writes only its inbox row and needs no
savepoint: the same code runs inside a batch's transaction (processor/batches.py), and alone
as a batch of one. Events go to `emit` as INSERT_EVENT's parameters; the caller writes
them in its transaction.

The PSP task each new refund carries is run by processor/refund_tasks.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from contracts import objects
from contracts import refunds as states
from contracts.commands import ApplyRefundResult, CreateRefund
from contracts.enums import EventType, IntentStatus, RefundStatus
from contracts.errors import PayonceError, ResourceMissing
from contracts.topology import Topology
from processor.intents import Applied, event_values

log = logging.getLogger(__name__)

REFUND_COMMANDS = (CreateRefund, ApplyRefundResult)
Emit = Callable[[tuple[Any, ...]], None]

# The inbox row names the refund, so a key Redis forgot is answered with it (edge/refunds.py).
FETCH_INBOX_FINGERPRINT = """
SELECT fingerprint FROM inbox WHERE account_id = $1 AND idempotency_key = $2
"""
REJECT_INBOX = """
UPDATE inbox SET outcome = 'rejected', error = $3 WHERE account_id = $1 AND idempotency_key = $2
"""
LOCK_INTENT = "SELECT * FROM payment_intents WHERE id = $1 AND account_id = $2 FOR UPDATE"
INSERT_INBOX = """
INSERT INTO inbox (account_id, idempotency_key, fingerprint, command, object_id, outcome,
                   request_id)
VALUES ($1, $2, $3, $4, $5, 'applied', $6)
ON CONFLICT (account_id, idempotency_key) DO NOTHING
RETURNING 1
"""
# The charge with what the PSP knows it by.
LOCK_CHARGE = """
SELECT c.*, a.psp_key FROM charges c JOIN payment_attempts a ON a.id = c.attempt_id
WHERE c.id = $1 AND c.account_id = $2
FOR UPDATE OF c
"""
INSERT_REFUND = """
INSERT INTO refunds (id, account_id, payment_intent_id, charge_id, amount, currency, status,
                     reason, failure_reason, metadata, charge_psp_key, psp_key, task,
                     request_id, commands_exchange, created)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, to_timestamp($16))
RETURNING *
"""
# `amount_refunded` moves by the refund's amount: up when it is created, down when it fails.
MOVE_REFUNDED = """
UPDATE charges SET amount_refunded = amount_refunded + $2 WHERE id = $1 RETURNING *
"""
LOCK_REFUND = "SELECT * FROM refunds WHERE id = $1 AND account_id = $2 FOR UPDATE"
# Settles the task, or, while the PSP may still fail the refund, makes it due again later.
UPDATE_REFUND = """
UPDATE refunds
SET status = $2, failure_reason = $3,
    task = CASE WHEN $4 THEN 'settled' ELSE 'pending' END,
    result = CASE WHEN $4 THEN result END,
    next_try_at = now() + make_interval(secs => $5 / 1000.0),
    locked_until = NULL, tries = 0, updated_at = now()
WHERE id = $1
RETURNING *
"""
FETCH_CHARGE = "SELECT * FROM charges WHERE id = $1"


def _refunded_fields(charge: Any) -> dict[str, Any]:
    rendered = objects.charge(charge)
    return {"amount_refunded": rendered["amount_refunded"], "refunded": rendered["refunded"]}


class Refunds:
    def __init__(self, secret: bytes, topology: Topology) -> None:
        self._secret = secret
        self._events_exchange = topology.events
        self._commands_exchange = topology.commands

    async def apply(self, conn: Any, command: CreateRefund | ApplyRefundResult,
                    emit: Emit) -> Applied:
        """Apply one refund command in the caller's transaction."""
        if isinstance(command, CreateRefund):
            return await self._create(conn, command, emit)
        return await self._result(conn, command, emit)

    def _event(self, emit: Emit, command: CreateRefund | ApplyRefundResult,
               event_type: EventType, rendered: dict[str, Any],
               previous: dict[str, Any] | None = None) -> None:
        emit(event_values(self._secret, self._events_exchange, command, event_type, None,
                          previous=previous, rendered=rendered))

    async def _create(self, conn: Any, c: CreateRefund, emit: Emit) -> Applied:
        first = await conn.fetchval(INSERT_INBOX, c.account_id, c.idempotency_key, c.fingerprint,
                                    c.TYPE, c.refund_id, c.request_id)
        if first is None:
            fingerprint = await conn.fetchval(FETCH_INBOX_FINGERPRINT, c.account_id,
                                              c.idempotency_key)
            if fingerprint != c.fingerprint:
                return Applied("duplicate", detail="same key, different request: ignored")
            return Applied("duplicate")
        try:
            charge = await self._refundable_charge(conn, c)
        except PayonceError as exc:
            await conn.execute(REJECT_INBOX, c.account_id, c.idempotency_key, exc.body()["error"])
            return Applied("rejected", detail=exc.message)
        left = charge["amount_captured"] - charge["amount_refunded"]
        fits = c.amount <= left
        status = RefundStatus.PENDING if fits else RefundStatus.FAILED
        refund = await conn.fetchrow(
            INSERT_REFUND, c.refund_id, c.account_id, c.intent_id, charge["id"], c.amount,
            charge["currency"], status.value, c.reason,
            None if fits else states.EXCEEDS_CAPTURED, c.metadata, charge["psp_key"],
            f"payonce_{c.refund_id}", "pending" if fits else "settled", c.request_id,
            self._commands_exchange, c.accepted_at)
        self._event(emit, c, EventType.REFUND_CREATED, objects.refund(refund))
        if not fits:
            log.warning("refund exceeds what is left to refund; failed",
                        extra={"ids": {"refund": c.refund_id, "amount": c.amount, "left": left}})
            self._event(emit, c, EventType.REFUND_FAILED, objects.refund(refund))
            return Applied("applied", detail=f"failed: {left} left to refund")
        updated = await conn.fetchrow(MOVE_REFUNDED, charge["id"], c.amount)
        self._event(emit, c, EventType.CHARGE_REFUNDED, objects.charge(updated),
                    previous=_refunded_fields(charge))
        return Applied("applied", refunds=[c.refund_id], detail="pending")

    async def _refundable_charge(self, conn: Any, c: CreateRefund) -> Any:
        """The charge to refund, locked; a PayonceError when there is none to refund. The edge
        checked the same against what it saw; this is what holds."""
        intent = await conn.fetchrow(LOCK_INTENT, c.intent_id, c.account_id)
        if intent is None:
            raise ResourceMissing(f"No such payment_intent: '{c.intent_id}'",
                                  param="payment_intent")
        charge = await conn.fetchrow(LOCK_CHARGE, c.charge_id, c.account_id)
        if charge is None or charge["payment_intent_id"] != intent["id"]:
            raise ResourceMissing(f"No such charge: '{c.charge_id}'", param="charge")
        if intent["status"] != IntentStatus.SUCCEEDED or charge["amount_captured"] <= 0:
            raise states.not_refundable(intent["id"], intent["status"])
        return charge

    async def _result(self, conn: Any, r: ApplyRefundResult, emit: Emit) -> Applied:
        refund = await conn.fetchrow(LOCK_REFUND, r.refund_id, r.account_id)
        # An answer is applied while the task holds it (reported); one without it is a
        # duplicate of an answer applied before.
        if refund is None or refund["task"] == "settled" or refund["result"] is None:
            return Applied("duplicate", detail="refund result already applied, or unknown")
        current, new = RefundStatus(refund["status"]), RefundStatus(r.status)
        if current == new:
            # Asked again and nothing changed: settled if final, else due again.
            await conn.fetchrow(UPDATE_REFUND, refund["id"], current.value,
                                refund["failure_reason"], r.final, r.recheck_ms)
            return Applied("applied", detail=f"still {current}")
        if not states.allowed(current, new):
            log.error("psp answer not allowed for the refund's status; ignored",
                      extra={"ids": {"refund": refund["id"], "status": current, "answer": new}})
            await conn.fetchrow(UPDATE_REFUND, refund["id"], current.value,
                                refund["failure_reason"], True, 0)
            return Applied("rejected", detail=f"refund is {current}")
        final = r.final or new == RefundStatus.FAILED
        updated = await conn.fetchrow(
            UPDATE_REFUND, refund["id"], new.value,
            (r.failure_reason or states.DECLINED) if new == RefundStatus.FAILED else None,
            final, r.recheck_ms)
        rendered = objects.refund(updated)
        previous = {"status": current.value}
        if new == RefundStatus.FAILED:
            charge = await conn.fetchrow(FETCH_CHARGE, refund["charge_id"])
            await conn.fetchrow(MOVE_REFUNDED, refund["charge_id"], -refund["amount"])
            self._event(emit, r, EventType.REFUND_FAILED, rendered, previous)
            log.warning("refund failed; its amount is back on the charge", extra={"ids": {
                "refund": refund["id"], "failure_reason": updated["failure_reason"],
                "amount_refunded_before": charge["amount_refunded"]}})
        self._event(emit, r, EventType.REFUND_UPDATED, rendered, previous)
        self._event(emit, r, EventType.CHARGE_REFUND_UPDATED, rendered, previous)
        return Applied("applied", detail=new.value)

