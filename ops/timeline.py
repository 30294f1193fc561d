"""One PaymentIntent's life, in order, from the database: the one source of `payonce trace`
(ops/trace.py, text for operators) and of `GET /v1/payment_intents/{id}/timeline`
(edge/timeline.py, JSON for the merchant).

What it tells, each as an `Entry`:

- `command`: every command the processor applied or refused for the intent (the inbox: its
  type, Idempotency-Key, request id, outcome and error). Commands accepted and not applied
  yet are not in the database, and so not here.
- `attempt_created`, `psp_result`, `attempt_updated`: every PSP attempt (payment_attempts),
  what the PSP's books say it answered, and where the attempt stands (tries, reports, result).
- `task_created`, `psp_operation`, `task_updated`: every PSP task that captures, voids or
  reverses what an attempt authorized (psp_tasks), when the PSP's books recorded it, and
  where the task stands.
- `refund_created`, `psp_refund`, `refund_updated`: every refund of the intent's charges, what
  the PSP's books say of it, and where it stands (its status and its PSP task's).
- `transition`: every status the intent took, from its events (`previous_attributes.status`
  → the status in the event's object; the first from `payment_intent.created`).
- `event`: every event of the intent and of its charges, and whether it left the outbox.
- `webhook_attempt`: every attempt to deliver one of those events to a webhook endpoint.

Order: by time, then in the order things happen within one transaction (a command, then the
attempt it starts, then the transitions and events it caused, each transition just before
its event), events among themselves in outbox order. Every statement of a transaction has
the same `now()`, so the time alone cannot order them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from contracts.enums import EventType

# `object_id = ANY(ARRAY(…))`, not `object_id = $1 OR object_id IN (…)`: the planner reads an
# OR with a subquery by scanning the whole table, and an array through the object's index.
COMMANDS = """
SELECT applied_at AS at, command, idempotency_key, request_id, outcome, error
FROM inbox WHERE object_id = ANY(ARRAY(
    SELECT $1::text UNION ALL SELECT id FROM refunds WHERE payment_intent_id = $1))
ORDER BY applied_at
"""
ATTEMPTS = """
SELECT a.created_at AS at, a.updated_at, a.id, a.charge_id, a.psp_key, a.amount, a.currency,
       a.payment_method, a.tries, a.state, a.reports, a.result,
       p.created_at AS psp_at, p.outcome AS psp_outcome, p.authorization_code AS psp_code,
       p.failure_code AS psp_failure_code, p.decline_code AS psp_decline_code
FROM payment_attempts a LEFT JOIN psp.charges p ON p.idempotency_key = a.psp_key
WHERE a.payment_intent_id = $1 ORDER BY a.created_at
"""
TASKS = """
SELECT t.created_at AS at, t.updated_at, t.id, t.kind, t.amount, t.psp_key, t.tries, t.state,
       t.reports, t.result, o.created_at AS psp_at
FROM psp_tasks t LEFT JOIN psp.operations o ON o.idempotency_key = t.psp_key
WHERE t.payment_intent_id = $1 ORDER BY t.created_at
"""
REFUNDS = """
SELECT r.created AS at, r.updated_at, r.id, r.amount, r.psp_key, r.status, r.failure_reason,
       r.task, r.tries, p.created_at AS psp_at, p.status AS psp_status
FROM refunds r LEFT JOIN psp.refunds p ON p.idempotency_key = r.psp_key
WHERE r.payment_intent_id = $1 ORDER BY r.created, r.id
"""
EVENTS = """
SELECT e.seq, e.created AS at, e.id, e.type, e.object_id, e.previous_attributes,
       NOT EXISTS (SELECT FROM events_outbox o WHERE o.exchange = e.exchange AND o.seq = e.seq)
           AS published,
       e.data->>'status' AS status
FROM events e WHERE e.object_id = ANY(ARRAY(
    SELECT $1::text UNION ALL SELECT id FROM charges WHERE payment_intent_id = $1
    UNION ALL SELECT id FROM refunds WHERE payment_intent_id = $1))
ORDER BY e.seq
"""
DELIVERIES = """
SELECT t.created AS at, d.event_id, d.endpoint_id, t.attempt, t.status_code, t.latency_ms, t.error
FROM webhook_attempts t JOIN webhook_deliveries d ON d.id = t.delivery_id
WHERE d.event_id = ANY($1::text[]) ORDER BY t.created, t.attempt
"""

TYPES = ("command", "attempt_created", "psp_result", "attempt_updated", "task_created",
         "psp_operation", "task_updated", "refund_created", "psp_refund", "refund_updated",
         "transition", "event", "webhook_attempt")
# Within one instant: what a transaction does first comes first.
_RANK = {"command": 0, "attempt_created": 1, "task_created": 1, "refund_created": 1,
         "psp_result": 2, "psp_operation": 2, "psp_refund": 2, "attempt_updated": 3,
         "task_updated": 3, "refund_updated": 3, "transition": 4, "event": 4,
         "webhook_attempt": 5}


@dataclass(frozen=True, slots=True)
class Entry:
    at: datetime
    type: str  # one of TYPES
    fields: dict[str, Any]  # what the entry says, by name, as the API shows it
    # Place among entries of the same time and rank: (event seq, 0 for its transition or 1).
    seq: tuple[int, int] = (0, 0)

    def sort_key(self) -> tuple[datetime, int, tuple[int, int]]:
        return self.at, _RANK[self.type], self.seq


async def gather(conn: Any, intent_id: str) -> list[Entry]:
    """Everything the database knows of the intent, in order; empty when it knows nothing.
    Read from one snapshot, so no entry is missing its cause or its effect for having been
    committed between two of the reads. Scoping to an account is the caller's (the edge reads
    the intent with its account first)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        entries = [_command(r) for r in await conn.fetch(COMMANDS, intent_id)]
        for a in await conn.fetch(ATTEMPTS, intent_id):
            entries.extend(_attempt(a))
        for t in await conn.fetch(TASKS, intent_id):
            entries.extend(_task(t))
        for r in await conn.fetch(REFUNDS, intent_id):
            entries.extend(_refund(r))
        events = list(await conn.fetch(EVENTS, intent_id))
        for e in events:
            entries.extend(_event(e, intent_id))
        for d in await conn.fetch(DELIVERIES, [e["id"] for e in events]):
            entries.append(Entry(d["at"], "webhook_attempt", {
                "event": d["event_id"], "webhook_endpoint": d["endpoint_id"],
                "attempt": d["attempt"], "status_code": d["status_code"], "error": d["error"],
                "latency_ms": d["latency_ms"]}))
    return sorted(entries, key=Entry.sort_key)


def _command(row: Any) -> Entry:
    return Entry(row["at"], "command", {
        "command": row["command"], "idempotency_key": row["idempotency_key"],
        "request_id": row["request_id"], "outcome": row["outcome"], "error": row["error"]})


def _attempt(row: Any) -> list[Entry]:
    found = [Entry(row["at"], "attempt_created", {
        "attempt": row["id"], "charge": row["charge_id"], "psp_key": row["psp_key"],
        "amount": row["amount"], "currency": row["currency"],
        "payment_method": row["payment_method"]})]
    if row["psp_at"] is not None:
        found.append(Entry(row["psp_at"], "psp_result", {
            "attempt": row["id"], "psp_key": row["psp_key"], "outcome": row["psp_outcome"],
            "authorization_code": row["psp_code"], "failure_code": row["psp_failure_code"],
            "decline_code": row["psp_decline_code"]}))
    found.append(Entry(row["updated_at"], "attempt_updated", {
        "attempt": row["id"], "state": row["state"], "tries": row["tries"],
        "reports": row["reports"], "result": row["result"]}))
    return found


def _task(row: Any) -> list[Entry]:
    found = [Entry(row["at"], "task_created", {
        "task": row["id"], "kind": row["kind"], "amount": row["amount"],
        "psp_key": row["psp_key"]})]
    if row["psp_at"] is not None:
        found.append(Entry(row["psp_at"], "psp_operation", {
            "task": row["id"], "kind": row["kind"], "psp_key": row["psp_key"]}))
    found.append(Entry(row["updated_at"], "task_updated", {
        "task": row["id"], "state": row["state"], "tries": row["tries"],
        "reports": row["reports"], "result": row["result"]}))
    return found


def _refund(row: Any) -> list[Entry]:
    found = [Entry(row["at"], "refund_created", {
        "refund": row["id"], "amount": row["amount"], "psp_key": row["psp_key"]})]
    if row["psp_at"] is not None:
        found.append(Entry(row["psp_at"], "psp_refund", {
            "refund": row["id"], "psp_key": row["psp_key"], "outcome": row["psp_status"]}))
    found.append(Entry(row["updated_at"], "refund_updated", {
        "refund": row["id"], "status": row["status"], "failure_reason": row["failure_reason"],
        "task": row["task"], "tries": row["tries"]}))
    return found


def _event(row: Any, intent_id: str) -> list[Entry]:
    previous = row["previous_attributes"] or {}
    found = []
    if row["object_id"] == intent_id and row["status"] is not None and (
            "status" in previous or row["type"] == EventType.INTENT_CREATED):
        found.append(Entry(row["at"], "transition", {
            "from": previous.get("status"), "to": row["status"], "event": row["id"]},
            seq=(row["seq"], 0)))
    found.append(Entry(row["at"], "event", {
        "event": row["id"], "event_type": row["type"], "object_id": row["object_id"],
        "previous_status": previous.get("status"), "status": row["status"],
        "published": row["published"]}, seq=(row["seq"], 1)))
    return found


# ---- as text, for `payonce trace` -----------------------------------------------------------

_LABEL = {"command": "command", "attempt_created": "attempt", "psp_result": "psp",
          "attempt_updated": "attempt", "task_created": "task", "psp_operation": "psp",
          "task_updated": "task", "refund_created": "refund", "psp_refund": "psp",
          "refund_updated": "refund", "transition": "status", "event": "event",
          "webhook_attempt": "webhook"}


def describe(entry: Entry) -> str:
    """One line of text for an entry."""
    f = entry.fields
    if entry.type == "command":
        outcome = f["outcome"] if f["error"] is None else \
            f"{f['outcome']}: {f['error'].get('message', '')}"
        return (f"{f['command']} {outcome} (Idempotency-Key {f['idempotency_key']!r}, "
                f"request {f['request_id']})")
    if entry.type == "attempt_created":
        return f"{f['attempt']} psp key {f['psp_key']}"
    if entry.type == "psp_result":
        return f"{f['psp_key']}: {f['outcome']}"
    if entry.type == "attempt_updated":
        return (f"{f['attempt']} {f['state']} after {f['tries']} tries"
                + (f", reported {f['reports'] + 1} times" if f["reports"] else "")
                + (f": {_result(f['result'])}" if f["result"] else ""))
    if entry.type == "task_created":
        return f"{f['task']} {f['kind']} of {f['amount']}, psp key {f['psp_key']}"
    if entry.type == "psp_operation":
        return f"{f['psp_key']}: {f['kind']} done"
    if entry.type == "task_updated":
        result = f["result"]
        return (f"{f['task']} {f['state']} after {f['tries']} tries"
                + (f", reported {f['reports'] + 1} times" if f["reports"] else "")
                + ("" if result is None else ": succeeded" if result.get("succeeded")
                   else f": refused, {result.get('failure_message')}"))
    if entry.type == "refund_created":
        return f"{f['refund']} of {f['amount']} psp key {f['psp_key']}"
    if entry.type == "psp_refund":
        return f"{f['psp_key']}: refund {f['outcome']}"
    if entry.type == "refund_updated":
        return (f"{f['refund']} {f['status']}"
                + (f" ({f['failure_reason']})" if f["failure_reason"] else "")
                + f", task {f['task']} after {f['tries']} tries")
    if entry.type == "transition":
        return f"{f['from'] or 'new'} → {f['to']} ({f['event']})"
    if entry.type == "event":
        change = f" ({f['previous_status']} → {f['status']})" if f["previous_status"] else ""
        published = "published" if f["published"] else "not yet published"
        return f"{f['event']} {f['event_type']}{change}, {published}"
    answer = f["status_code"] or f["error"]
    return (f"{f['event']} → {f['webhook_endpoint']} attempt {f['attempt']}: {answer} "
            f"in {f['latency_ms']} ms")


def _result(result: dict[str, Any]) -> str:
    if result.get("succeeded"):
        return f"authorized {result.get('authorization_code')}"
    return f"declined {result.get('failure_code')}/{result.get('decline_code')}"


def render(entries: list[Entry]) -> str:
    return "".join(f"{e.at.isoformat(timespec='milliseconds')}  {_LABEL[e.type]:<8} "
                   f"{describe(e)}\n" for e in entries)
