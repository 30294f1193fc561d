"""`payonce trace pi_…`: one payment's life, in order, from the database: the commands
accepted for it, its transitions, its PSP calls and their results (refunds included), its
events and their webhook deliveries. The same ids are in every log line (edge, processor,
dispatcher), so the logs of any of these steps are one `grep` away."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ops.postgres import connect

COMMANDS = """
SELECT applied_at AS at, command, idempotency_key, request_id, outcome, error
FROM inbox WHERE object_id = $1
   OR object_id IN (SELECT id FROM refunds WHERE payment_intent_id = $1)
"""
ATTEMPTS = """
SELECT a.created_at AS at, a.updated_at, a.id, a.psp_key, a.tries, a.state, a.reports, a.result,
       p.created_at AS psp_at, p.outcome AS psp_outcome
FROM payment_attempts a LEFT JOIN psp.charges p ON p.idempotency_key = a.psp_key
WHERE a.payment_intent_id = $1
"""
REFUNDS = """
SELECT r.created AS at, r.updated_at, r.id, r.amount, r.psp_key, r.status, r.failure_reason,
       r.task, r.tries, p.created_at AS psp_at, p.status AS psp_status
FROM refunds r LEFT JOIN psp.refunds p ON p.idempotency_key = r.psp_key
WHERE r.payment_intent_id = $1
"""
EVENTS = """
SELECT e.created AS at, e.id, e.type, e.object_id, e.previous_attributes, e.published_at,
       e.data->>'status' AS status
FROM events e WHERE e.object_id = $1
    OR e.object_id IN (SELECT id FROM charges WHERE payment_intent_id = $1)
    OR e.object_id IN (SELECT id FROM refunds WHERE payment_intent_id = $1)
"""
DELIVERIES = """
SELECT t.created AS at, d.event_id, d.endpoint_id, t.attempt, t.status_code, t.latency_ms, t.error
FROM webhook_attempts t JOIN webhook_deliveries d ON d.id = t.delivery_id
WHERE d.event_id = ANY($1::text[])
"""


@dataclass(frozen=True, slots=True)
class Step:
    at: datetime
    what: str
    detail: str


async def trace(database_url: str, intent_id: str, *, timeout_s: float) -> list[Step]:
    conn = await connect(database_url, timeout_s=timeout_s)
    try:
        steps = [_command(r) for r in await conn.fetch(COMMANDS, intent_id)]
        for a in await conn.fetch(ATTEMPTS, intent_id):
            steps.append(Step(a["at"], "attempt", f"{a['id']} psp key {a['psp_key']}"))
            if a["psp_at"] is not None:
                steps.append(Step(a["psp_at"], "psp", f"{a['psp_key']}: {a['psp_outcome']}"))
            steps.append(Step(a["updated_at"], "attempt",
                              f"{a['id']} {a['state']} after {a['tries']} tries"
                              + (f", reported {a['reports'] + 1} times" if a["reports"] else "")
                              + (f": {_result(a['result'])}" if a["result"] else "")))
        for r in await conn.fetch(REFUNDS, intent_id):
            steps.append(Step(r["at"], "refund", f"{r['id']} of {r['amount']} psp key "
                                                 f"{r['psp_key']}"))
            if r["psp_at"] is not None:
                steps.append(Step(r["psp_at"], "psp", f"{r['psp_key']}: refund "
                                                      f"{r['psp_status']}"))
            steps.append(Step(r["updated_at"], "refund",
                              f"{r['id']} {r['status']}"
                              + (f" ({r['failure_reason']})" if r["failure_reason"] else "")
                              + f", task {r['task']} after {r['tries']} tries"))
        events = list(await conn.fetch(EVENTS, intent_id))
        for e in events:
            change = ""
            previous = e["previous_attributes"] or {}
            if "status" in previous:
                change = f" ({previous['status']} → {e['status']})"
            published = "published" if e["published_at"] else "not yet published"
            steps.append(Step(e["at"], "event", f"{e['id']} {e['type']}{change}, {published}"))
        for d in await conn.fetch(DELIVERIES, [e["id"] for e in events]):
            answer = d["status_code"] or d["error"]
            steps.append(Step(d["at"], "webhook", f"{d['event_id']} → {d['endpoint_id']} "
                                                  f"attempt {d['attempt']}: {answer} "
                                                  f"in {d['latency_ms']} ms"))
    finally:
        await conn.close()
    return sorted(steps, key=lambda s: s.at)


def _command(row: Any) -> Step:
    outcome = row["outcome"] if row["error"] is None else \
        f"{row['outcome']}: {row['error'].get('message', '')}"
    return Step(row["at"], "command", f"{row['command']} {outcome} (Idempotency-Key "
                                      f"{row['idempotency_key']!r}, request {row['request_id']})")


def _result(result: dict[str, Any]) -> str:
    if result.get("succeeded"):
        return f"authorized {result.get('authorization_code')}"
    return f"declined {result.get('failure_code')}/{result.get('decline_code')}"


def render(steps: list[Step]) -> str:
    return "".join(f"{s.at.isoformat(timespec='milliseconds')}  {s.what:<8} {s.detail}\n"
                   for s in steps)
