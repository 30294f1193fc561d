"""Updates, cancels, captures, expiries and the results of PSP tasks, applied inside a batch's
transaction (processor/batches.py) with the batch's guarantees: the inbox already deduped the
client's commands, at most one command per intent is in a batch, and what each command does
is decided in Python from the rows locked `FOR UPDATE`, with the transition table, before one
multi-row statement per table writes it all.

Money moves only through PSP tasks (processor/psp_tasks.py), committed here with the state
change that asks for them: a capture asks for a `capture` of the intent's authorization; a
cancel of an intent waiting for its capture asks for a `void`; an attempt's result that comes
back to an intent canceled meanwhile asks for a `void` of the authorization (or a `reverse`
of the automatic capture) from processor/batches.py. A task's id is derived from the message
that asks for it, so a command applied again asks for the same task.

What each task's result does:

- capture succeeded: the intent `succeeded` with `amount_received`; the charge captured
  that much and released the rest (`charge.captured`, `payment_intent.succeeded`);
- capture refused: the intent back to `requires_capture`, its authorization held as before;
- void or reverse succeeded: the charge gives back what it held (`charge.refunded`);
- void or reverse refused: nothing moved; logged, for an operator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from contracts import ids, objects
from contracts.commands import (
    ApplyTaskResult,
    CancelIntent,
    CaptureIntent,
    ClientCommand,
    Command,
    ExpireAuthorization,
    UpdateIntent,
    merge_metadata,
)
from contracts.enums import CancellationReason, EventType, TaskKind
from contracts.enums import IntentStatus as S
from contracts.errors import PayonceError, ResourceMissing, UnexpectedState, capture_too_large
from contracts.transitions import CAPTURING, Action, next_status, state
from processor.intents import LOCK_INTENTS, Applied, Rows

log = logging.getLogger(__name__)

# Commands applied here; batches.py sends them.
CLIENT_COMMANDS = (UpdateIntent, CancelIntent, CaptureIntent)
SYSTEM_COMMANDS = (ExpireAuthorization, ApplyTaskResult)

# Locked in id order, as the runners' statements lock them (processor/attempts.py, ordered).
SETTLE_TASKS = """
UPDATE psp_tasks SET state = 'settled', locked_until = NULL, updated_at = now()
WHERE id IN (SELECT id FROM psp_tasks WHERE id = ANY($1::text[]) AND state <> 'settled'
             ORDER BY id FOR UPDATE)
RETURNING *
"""
LOCK_CHARGES = """
SELECT c.*, a.psp_key FROM charges c JOIN payment_attempts a ON a.id = c.attempt_id
WHERE c.id = ANY($1::text[])
FOR UPDATE OF c
"""
INSERT_TASKS = """
INSERT INTO psp_tasks (id, account_id, payment_intent_id, charge_id, kind, psp_key,
                       authorization_key, amount, request_id, commands_exchange)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::bigint[], $9::text[], $10::text[])
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
# Every column a command here may change, for all the batch's intents in one statement.
WRITE_INTENTS = """
UPDATE payment_intents p
SET status = u.st::payment_intent_status, amount = u.amt, currency = u.cur, customer = u.cu,
    description = u.d, metadata = u.m, payment_method = u.pm, capture_method = u.cm,
    amount_capturable = u.cap, amount_received = u.rec, canceled_at = u.ca,
    cancellation_reason = u.cr, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
            $7::jsonb[], $8::text[], $9::text[], $10::bigint[], $11::bigint[],
            $12::timestamptz[], $13::text[])
     AS u(i, st, amt, cur, cu, d, m, pm, cm, cap, rec, ca, cr)
WHERE p.id = u.i
RETURNING p.*
"""
INTENT_COLUMNS = ("id", "status", "amount", "currency", "customer", "description", "metadata",
                  "payment_method", "capture_method", "amount_capturable", "amount_received",
                  "canceled_at", "cancellation_reason")
WRITE_CHARGES = """
UPDATE charges c SET amount_captured = u.cap, amount_released = u.rel
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(i, cap, rel)
WHERE c.id = u.i
RETURNING c.*
"""


def task_values(secret: bytes, cause: Command, kind: TaskKind, charge: Any, amount: int,
                exchange: str) -> tuple[Any, ...]:
    """The columns of the psp_tasks row `cause` asks for (INSERT_TASKS's parameters); `charge`
    carries the authorization's PSP key (`psp_key`, as LOCK_CHARGES reads it)."""
    task_id = ids.task_id(secret, cause.message_id, kind)
    return (task_id, cause.account_id, cause.intent_id, charge["id"], kind.value,
            f"payonce_{task_id}", charge["psp_key"], amount, cause.request_id or None, exchange)


@dataclass
class _Plan:
    """What the batch's lifecycle commands write, gathered before any of it is written."""

    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: Rows = field(default_factory=lambda: Rows(10))
    # (command, event type, "intent" or "charge", object id, previous attributes), in order.
    events: list[tuple[Command, EventType, str, str, dict[str, Any] | None]] = field(
        default_factory=list)


class Lifecycle:
    """The lifecycle commands of one batch; `emit(command, type, row, previous=, rendered=)`
    is the batch's event writer."""

    def __init__(self, secret: bytes, commands_exchange: str,
                 emit: Callable[..., None]) -> None:
        self._secret = secret
        self._exchange = commands_exchange
        self._emit = emit

    async def apply(self, conn: Any, items: Sequence[tuple[int, Command]], rejected: Rows
                    ) -> list[tuple[int, Applied]]:
        """Each command's outcome by its index in the batch; a client command refused is
        added to `rejected` (the inbox's rejections)."""
        done: list[tuple[int, Applied]] = []
        results = [c.task_id for _, c in items if isinstance(c, ApplyTaskResult)]
        tasks = ({t["id"]: t for t in await conn.fetch(SETTLE_TASKS, results)}
                 if results else {})
        live: list[tuple[int, Command]] = []
        for i, c in items:
            if isinstance(c, ApplyTaskResult) and c.task_id not in tasks:
                done.append((i, Applied("duplicate", detail="task already settled, or unknown")))
            else:
                live.append((i, c))
        if not live:
            return done
        intents = {r["id"]: r for r in await conn.fetch(
            LOCK_INTENTS, [c.intent_id for _, c in live])}
        wanted = {t["charge_id"] for t in tasks.values()}
        wanted |= {r["latest_charge"] for r in intents.values() if r["latest_charge"]}
        charges = {r["id"]: r for r in await conn.fetch(LOCK_CHARGES, sorted(wanted))}
        plan = _Plan()
        for i, c in live:
            row = intents.get(c.intent_id)
            try:
                if row is None or row["account_id"] != c.account_id:
                    raise ResourceMissing(f"No such payment_intent: '{c.intent_id}'")
                applied = self._decide(c, row, charges, tasks, plan)
            except PayonceError as exc:
                if isinstance(c, ClientCommand):
                    rejected.add(c.account_id, c.idempotency_key, exc.body()["error"])
                done.append((i, Applied("rejected", detail=exc.message)))
                continue
            done.append((i, applied))
        await self._write(conn, plan)
        return done

    def _decide(self, c: Command, row: Any, charges: dict[str, Any], tasks: dict[str, Any],
                plan: _Plan) -> Applied:
        new = dict(row)
        if isinstance(c, UpdateIntent):
            applied = self._update(c, new)
        elif isinstance(c, CancelIntent | ExpireAuthorization):
            applied = self._cancel(c, new, charges, plan)
        elif isinstance(c, CaptureIntent):
            applied = self._capture(c, new, charges, plan)
        else:
            assert isinstance(c, ApplyTaskResult)
            applied = self._task_result(c, new, tasks[c.task_id], charges, plan)
        if new != dict(row):
            plan.intents[row["id"]] = new
        return applied

    def _ask(self, plan: _Plan, applied: Applied, cause: Command, kind: TaskKind, charge: Any,
             amount: int) -> None:
        """A PSP task `cause` asks for, written with the batch and run once it committed."""
        values = task_values(self._secret, cause, kind, charge, amount, self._exchange)
        plan.tasks.add(*values)
        applied.tasks.append(values[0])

    def _update(self, c: UpdateIntent, new: dict[str, Any]) -> Applied:
        current = state(new)
        status = S(new["status"])
        for name, value in c.changes.items():
            if name == "payment_method":
                status = next_status(Action.ATTACH, current, param=name)
            elif name == "description":
                next_status(Action.ANNOTATE, current, param=name)
            else:
                next_status(Action.UPDATE, current, param=name)
            new[name] = value
        if c.metadata is not None:
            next_status(Action.ANNOTATE, current, param="metadata")
            new["metadata"] = merge_metadata(new["metadata"], c.metadata)
        new["status"] = status
        # Stripe sends no event for an update.
        return Applied("applied", detail=status)

    def _cancel(self, c: CancelIntent | ExpireAuthorization, new: dict[str, Any],
                charges: dict[str, Any], plan: _Plan) -> Applied:
        current = state(new)
        if isinstance(c, ExpireAuthorization):
            if current != S.REQUIRES_CAPTURE or new["latest_charge"] != c.charge_id:
                raise UnexpectedState(f"the authorization {c.charge_id} no longer waits for a "
                                      f"capture: the intent is {new['status']}")
            reason: str | None = CancellationReason.AUTOMATIC.value
        else:
            reason = c.cancellation_reason
        next_status(Action.CANCEL, current)
        applied = Applied("applied", detail=f"canceled from {new['status']}")
        if current == S.REQUIRES_CAPTURE:
            charge = charges[new["latest_charge"]]
            self._ask(plan, applied, c, TaskKind.VOID, charge,
                      charge["amount"] - charge["amount_captured"])
        # A cancel while processing leaves the attempt running: its result voids what it
        # authorized (processor/batches.py).
        previous = {"status": new["status"]}
        new.update(status=S.CANCELED.value, amount_capturable=0, cancellation_reason=reason,
                   canceled_at=datetime.fromtimestamp(c.accepted_at, UTC))
        plan.events.append((c, EventType.INTENT_CANCELED, "intent", new["id"], previous))
        return applied

    def _capture(self, c: CaptureIntent, new: dict[str, Any], charges: dict[str, Any],
                 plan: _Plan) -> Applied:
        status = next_status(Action.CAPTURE, state(new))
        capturable = new["amount_capturable"]
        amount = capturable if c.amount_to_capture is None else c.amount_to_capture
        if amount > capturable:
            raise capture_too_large(amount, capturable)
        applied = Applied("applied", detail=f"capturing {amount}")
        self._ask(plan, applied, c, TaskKind.CAPTURE, charges[new["latest_charge"]], amount)
        # Still holding its authorization (amount_capturable) while the capture runs: the
        # table's CAPTURING.
        new["status"] = status.value
        return applied

    def _task_result(self, r: ApplyTaskResult, new: dict[str, Any], task: Any,
                     charges: dict[str, Any], plan: _Plan) -> Applied:
        kind = TaskKind(task["kind"])
        charge = dict(plan.charges.get(task["charge_id"]) or charges[task["charge_id"]])
        if not r.succeeded:
            # Counted where the PSP refused it (payonce_processor_psp_calls_total{result=
            # "rejected"}); a refused void or reverse leaves money for an operator to give back.
            log.error("psp refused a task", extra={"ids": {
                "task": task["id"], "kind": kind, "error": r.failure_message}})
            if kind is TaskKind.CAPTURE and state(new) == CAPTURING:
                new["status"] = next_status(Action.CAPTURE_FAILED, CAPTURING).value
            return Applied("applied", detail=f"{kind} refused: {r.failure_message}")
        if kind is TaskKind.CAPTURE:
            current = state(new)
            if current != CAPTURING:
                log.error("capture result for an intent not capturing", extra={"ids": {
                    "task": task["id"], "status": new["status"]}})
                raise UnexpectedState(f"the intent is {new['status']}, not capturing")
            status = next_status(Action.CAPTURED, current)
            charge.update(amount_captured=task["amount"],
                          amount_released=charge["amount"] - task["amount"])
            plan.charges[charge["id"]] = charge
            plan.events.append((r, EventType.CHARGE_CAPTURED, "charge", charge["id"], None))
            plan.events.append((r, EventType.INTENT_SUCCEEDED, "intent", new["id"],
                                {"status": new["status"]}))
            new.update(status=status.value, amount_received=task["amount"], amount_capturable=0)
            return Applied("applied", detail=f"captured {task['amount']}")
        charge["amount_released"] = charge["amount_released"] + task["amount"]
        plan.charges[charge["id"]] = charge
        plan.events.append((r, EventType.CHARGE_REFUNDED, "charge", charge["id"], None))
        return Applied("applied", detail=f"{kind} of {task['amount']}")

    async def _write(self, conn: Any, plan: _Plan) -> None:
        updated: dict[str, Any] = {}
        if plan.intents:
            columns = Rows(len(INTENT_COLUMNS))
            for values in plan.intents.values():
                columns.add(*(values[name] for name in INTENT_COLUMNS))
            updated = {r["id"]: r for r in await conn.fetch(WRITE_INTENTS, *columns.columns)}
        charged: dict[str, Any] = {}
        if plan.charges:
            columns = Rows(3)
            for values in plan.charges.values():
                columns.add(values["id"], values["amount_captured"], values["amount_released"])
            charged = {r["id"]: r for r in await conn.fetch(WRITE_CHARGES, *columns.columns)}
        if plan.tasks:
            await conn.execute(INSERT_TASKS, *plan.tasks.columns)
        for command, event_type, kind, object_id, previous in plan.events:
            if kind == "intent":
                self._emit(command, event_type, updated[object_id], previous=previous)
            else:
                self._emit(command, event_type, charged[object_id],
                           rendered=objects.charge(charged[object_id]))
