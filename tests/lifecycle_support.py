"""Helpers for the lifecycle tests: intents brought to a state, waits on what the processor
applied (not on what the edge projected), and the PSP simulator's books for one intent."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.conftest import Client, Reply

VISA = "pm_card_visa"

# The PSP's books for an intent's authorizations: the charge, and every operation on it.
BOOKS = """
SELECT p.idempotency_key, p.amount, p.outcome,
       coalesce(array_agg(o.kind ORDER BY o.created_at) FILTER (WHERE o.kind IS NOT NULL),
                '{}') AS kinds,
       coalesce(sum(o.amount) FILTER (WHERE o.kind = 'capture'), 0) AS captured_later,
       coalesce(sum(o.amount) FILTER (WHERE o.kind = 'void'), 0) AS voided,
       coalesce(sum(o.amount) FILTER (WHERE o.kind = 'reverse'), 0) AS reversed
FROM payment_attempts a
JOIN psp.charges p ON p.idempotency_key = a.psp_key
LEFT JOIN psp.operations o ON o.charge_key = p.idempotency_key
WHERE a.payment_intent_id = $1
GROUP BY p.idempotency_key, p.amount, p.outcome
"""
UNFINISHED_TASKS = """
SELECT count(*) FROM psp_tasks WHERE payment_intent_id = $1 AND state <> 'settled'
"""
UNFINISHED_ATTEMPTS = """
SELECT count(*) FROM payment_attempts WHERE payment_intent_id = $1 AND state <> 'settled'
"""


def expect(reply: Reply, status: int = 202) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    return reply.body  # type: ignore[no-any-return]


async def settled(api: Client, intent_id: str, status: str | tuple[str, ...],
                  within_s: float = 30.0) -> dict[str, Any]:
    """The intent once the processor left it in `status` (or one of them) with no PSP work
    outstanding (every attempt and task settled), read back through the API."""
    wanted = (status,) if isinstance(status, str) else status
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        row = await api.db.fetchrow("SELECT status FROM payment_intents WHERE id = $1",
                                    intent_id)
        if (row is not None and row["status"] in wanted
                and not await api.db.fetchval(UNFINISHED_TASKS, intent_id)
                and not await api.db.fetchval(UNFINISHED_ATTEMPTS, intent_id)):
            return expect(await api.get(f"/v1/payment_intents/{intent_id}"), 200)
        await asyncio.sleep(0.05)
    row = await api.db.fetchrow("SELECT status FROM payment_intents WHERE id = $1", intent_id)
    raise AssertionError(f"{intent_id} not settled in {status} after {within_s}s: {row}")


async def authorized(api: Client, amount: int = 1000, **extra: Any) -> dict[str, Any]:
    """A manual-capture intent, confirmed on create, holding its authorization."""
    created = expect(await api.create(amount=amount, currency="usd", payment_method=VISA,
                                      confirm=True, capture_method="manual", **extra))
    assert (created["status"], created["capture_method"]) == ("processing", "manual")
    return await settled(api, created["id"], "requires_capture")


async def charge_of(api: Client, intent_id: str) -> dict[str, Any]:
    return expect(await api.get(f"/v1/payment_intents/{intent_id}/charge"), 200)


async def books(api: Client, intent_id: str) -> list[Any]:
    return list(await api.db.fetch(BOOKS, intent_id))


async def event_types(api: Client, *object_ids: str) -> list[str]:
    rows = await api.db.fetch("SELECT type FROM events WHERE object_id = ANY($1) ORDER BY seq",
                              list(object_ids))
    return [r["type"] for r in rows]


async def inbox_outcomes(api: Client, intent_id: str) -> dict[str, list[str]]:
    """Command type -> the outcome of each such command of the intent, as the inbox has it."""
    rows = await api.db.fetch("SELECT command, outcome FROM inbox WHERE object_id = $1",
                              intent_id)
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["command"], []).append(r["outcome"])
    return out
