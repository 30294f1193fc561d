"""Helpers for the tests that crash, stop and load processes: payments made in bulk, and the
checks that nothing was lost (outcomes, the PSP's books, events)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika

from contracts.topology import Topology
from ops.settings import Settings
from tests import stripe_schema
from tests.conftest import Client, Proc, form, start_proc

VISA = "pm_card_visa"
DECLINED = "pm_card_visa_chargeDeclined"
RESTING = ("succeeded", "requires_payment_method", "canceled")
EXPECTED_EVENTS = {
    VISA: ["payment_intent.created", "payment_intent.processing", "charge.succeeded",
           "payment_intent.succeeded"],
    DECLINED: ["payment_intent.created", "payment_intent.processing", "charge.failed",
               "payment_intent.payment_failed"],
}


async def start_processor(settings: Settings, procs: list[Proc], tmp_path: Path,
                          **env: str) -> Proc:
    return await start_proc("processor", settings, procs, tmp_path, **env)


class Amounts:
    """Amounts unique to one test, so the PSP's books (which know no accounts) can be read
    for this test alone."""

    def __init__(self, count: int) -> None:
        self.base = random.randrange(10_000_000, 90_000_000)
        self.count = count
        self._next = 0

    def take(self) -> int:
        assert self._next < self.count
        self._next += 1
        return self.base + self._next - 1


class EventTap:
    """A queue bound to the events exchange with '#', bound before anything is created."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: set[str] = set()

    @asynccontextmanager
    async def bound(self) -> AsyncIterator[EventTap]:
        topology = Topology(self.settings.amqp_prefix, self.settings.partitions)
        connection = await aio_pika.connect(self.settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            self.queue = await channel.declare_queue(exclusive=True)
            await self.queue.bind(topology.events, routing_key="#")
            yield self

    async def receive(self, wanted: set[str], within_s: float = 30.0) -> None:
        try:
            async with asyncio.timeout(within_s):
                while not wanted <= self.seen:
                    message = await self.queue.get(no_ack=True, fail=False)
                    if message is None:
                        await asyncio.sleep(0.05)
                        continue
                    assert message.message_id
                    self.seen.add(message.message_id)
        except TimeoutError:
            missing = sorted(wanted - self.seen)
            raise AssertionError(f"{len(missing)} events never reached the exchange: "
                                 f"{missing[:5]}") from None


async def create(api: Client, amount: int, payment_method: str, *, confirm_separately: bool,
                 key: str | None = None) -> str:
    """Create (and confirm) one intent; its id once every command was accepted (202)."""
    if confirm_separately:
        created = await api.post("/v1/payment_intents", form(
            {"amount": amount, "currency": "usd", "payment_method": payment_method}),
            key=key or str(uuid.uuid4()))
        assert created.status == 202, created.body
        confirmed = await api.post(f"/v1/payment_intents/{created.body['id']}/confirm")
        assert confirmed.status == 202, confirmed.body
        return str(created.body["id"])
    created = await api.post("/v1/payment_intents", form(
        {"amount": amount, "currency": "usd", "payment_method": payment_method,
         "confirm": True}), key=key or str(uuid.uuid4()))
    assert created.status == 202, created.body
    return str(created.body["id"])


async def unsettled(db: Any, account_id: str, expected: int) -> int:
    """Intents of the account not yet at rest (including ones not applied yet)."""
    rested = await db.fetchval(
        "SELECT count(*) FROM payment_intents WHERE account_id = $1 AND status = ANY($2)",
        account_id, list(RESTING))
    return expected - int(rested)


async def wait_settled(db: Any, account_id: str, expected: int,
                       within_s: float = 60.0) -> dict[str, Any]:
    """Every intent of the account at rest; {id: row}."""
    deadline = time.monotonic() + within_s
    while await unsettled(db, account_id, expected) > 0:
        if time.monotonic() > deadline:
            rows = await db.fetch("SELECT id, status FROM payment_intents WHERE account_id = $1",
                                  account_id)
            stuck = [(r["id"], r["status"]) for r in rows if r["status"] not in RESTING]
            raise AssertionError(f"{expected - len(rows) + len(stuck)} of {expected} intents "
                                 f"not at rest after {within_s}s; applied but stuck: {stuck[:5]}")
        await asyncio.sleep(0.1)
    rows = await db.fetch("SELECT * FROM payment_intents WHERE account_id = $1", account_id)
    assert len(rows) == expected
    return {r["id"]: r for r in rows}


def check_outcomes(intents: dict[str, Any], cards: dict[str, str]) -> None:
    """Each intent ended as its card says: visa succeeded, a decline card declined."""
    assert set(intents) == set(cards)
    for intent_id, card in cards.items():
        row = intents[intent_id]
        if card == VISA:
            assert row["status"] == "succeeded", (intent_id, row["status"])
            assert row["amount_received"] == row["amount"]
        else:
            assert row["status"] == "requires_payment_method", (intent_id, row["status"])
            error = row["last_payment_error"]
            assert error["decline_code"] == "generic_decline", (intent_id, error)


LEDGER = """
SELECT a.id, a.payment_intent_id, a.psp_key, a.state, c.status AS charge_status,
       c.authorization_code, c.failure_code, p.outcome, p.authorization_code AS psp_code,
       p.failure_code AS psp_failure_code
FROM payment_attempts a
LEFT JOIN charges c ON c.attempt_id = a.id
LEFT JOIN psp.charges p ON p.idempotency_key = a.psp_key
WHERE a.account_id = $1
"""
PSP_BOOKS = """
SELECT idempotency_key FROM psp.charges
WHERE amount >= $1 AND amount < $2 AND created_at >= $3
"""


async def check_ledger(db: Any, account_id: str, amounts: Amounts, since: Any,
                       attempts_per_intent: dict[str, int]) -> list[Any]:
    """One PSP authorization per attempt, none without an attempt, and the charge we recorded
    for each attempt says what the PSP's books say."""
    attempts = await db.fetch(LEDGER, account_id)
    per_intent: dict[str, int] = {}
    for a in attempts:
        per_intent[a["payment_intent_id"]] = per_intent.get(a["payment_intent_id"], 0) + 1
    assert per_intent == attempts_per_intent
    books = await db.fetch(PSP_BOOKS, amounts.base, amounts.base + amounts.count, since)
    assert len(books) == len(attempts)
    assert sorted(b["idempotency_key"] for b in books) == sorted(a["psp_key"] for a in attempts)
    for a in attempts:
        assert a["outcome"] is not None, f"attempt {a['id']} never reached the PSP"
        assert a["state"] == "settled", (a["id"], a["state"])
        expected = "failed" if a["outcome"] == "declined" else "succeeded"
        assert a["charge_status"] == expected, (a["id"], a["charge_status"], a["outcome"])
        assert a["authorization_code"] == a["psp_code"], a["id"]
        assert a["failure_code"] == a["psp_failure_code"], a["id"]
    return list(attempts)


async def unpublished(db: Any, account_id: str) -> int:
    """The account's events still waiting for the outbox relay."""
    return int(await db.fetchval(
        "SELECT count(*) FROM events e JOIN events_outbox o ON o.seq = e.seq "
        "WHERE e.account_id = $1", account_id))


async def check_events(db: Any, account_id: str, cards: dict[str, str],
                       tap: EventTap | None) -> None:
    """Each intent has its created, processing and outcome events, in order, all published
    (and, with a tap, all received from the events exchange), each object as Stripe's schema
    has it."""
    deadline = time.monotonic() + 30
    while await unpublished(db, account_id):
        assert time.monotonic() < deadline, "events left unpublished"
        await asyncio.sleep(0.1)
    rows = await db.fetch("SELECT id, type, data FROM events WHERE account_id = $1 ORDER BY seq",
                          account_id)
    by_intent: dict[str, list[str]] = {}
    for row in rows:
        obj = row["data"]
        stripe_schema.check(obj["object"], obj)
        intent_id = obj["id"] if obj["object"] == "payment_intent" else obj["payment_intent"]
        by_intent.setdefault(intent_id, []).append(row["type"])
    assert by_intent == {i: EXPECTED_EVENTS[card] for i, card in cards.items()}
    if tap is not None:
        await tap.receive({r["id"] for r in rows})


