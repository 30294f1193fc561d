"""Crashes and PSP faults: every accepted intent still reaches its outcome, the PSP sees one
authorization per attempt, and no event is lost.

Processes are killed the hard way (SIGKILL, or a failpoint that `os._exit`s at an exact step)
and started again; the checks then read Postgres, the PSP simulator's books and the events
exchange. The helpers here are shared with test_shutdown.py.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from contracts import ids
from contracts.topology import Topology
from ops.settings import Settings
from processor.outbox import _LOCK as RELAY_LOCK
from tests.conftest import (
    Client,
    Proc,
    form,
    make_settings,
    settings_env,
    stack,
    wait_http,
)

VISA = "pm_card_visa"
DECLINED = "pm_card_visa_chargeDeclined"
RESTING = ("succeeded", "requires_payment_method", "canceled")
EXPECTED_EVENTS = {
    VISA: ["payment_intent.created", "payment_intent.processing", "charge.succeeded",
           "payment_intent.succeeded"],
    DECLINED: ["payment_intent.created", "payment_intent.processing", "charge.failed",
               "payment_intent.payment_failed"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoggedProc(Proc):
    """A Proc whose stderr (its log) goes to a file: an unread pipe would fill up and stall
    the process, and the log is what explains a failure."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        super().__init__(args, env)
        self.log_path = log_path

    def start(self) -> LoggedProc:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", *self.args], env=self.env,
                stdout=subprocess.DEVNULL, stderr=log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_exit(self, within_s: float) -> int:
        assert self.popen is not None
        return await asyncio.to_thread(self.popen.wait, within_s)

    async def sigterm(self, within_s: float) -> int:
        """SIGTERM, then the exit code; the event loop keeps running meanwhile."""
        assert self.popen is not None
        self.popen.terminate()
        return await self.wait_exit(within_s)


async def start_proc(
    kind: str, settings: Settings, procs: list[Proc], tmp_path: Path, **env: str
) -> LoggedProc:
    """An edge or processor subprocess with these settings, once its /health answers."""
    port = settings.edge_port if kind == "edge" else settings.processor_metrics_port
    assert port, "give the subprocess a fixed port to wait for"
    log_path = tmp_path / f"{kind}-{len(procs)}.log"
    proc = LoggedProc([kind], settings_env(settings, **env), log_path).start()
    procs.append(proc)
    try:
        await wait_http(f"http://127.0.0.1:{port}/health")
    except AssertionError:
        raise AssertionError(f"{kind} did not start:\n{proc.log()[-3000:]}") from None
    return proc


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


async def relay_lock_free(db: Any, within_s: float = 15.0) -> None:
    """The outbox relay's advisory lock is per database: while another processor on the test
    database holds it, that processor publishes our events to its own exchange. Wait for any
    earlier processor to go away, and say so clearly if one stays."""
    deadline = time.monotonic() + within_s
    async with db.acquire() as conn:
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK):
            if time.monotonic() > deadline:
                raise AssertionError(
                    "another processor's outbox relay holds the relay lock on the test "
                    "database (a session-wide stack or a concurrent test run); it would "
                    "publish this test's events to its own exchange")
            await asyncio.sleep(0.2)
        await conn.fetchval("SELECT pg_advisory_unlock($1)", RELAY_LOCK)


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
        expected = "succeeded" if a["outcome"] == "captured" else "failed"
        assert a["charge_status"] == expected, (a["id"], a["charge_status"], a["outcome"])
        assert a["authorization_code"] == a["psp_code"], a["id"]
        assert a["failure_code"] == a["psp_failure_code"], a["id"]
    return attempts


async def check_events(db: Any, account_id: str, cards: dict[str, str],
                       tap: EventTap | None) -> None:
    """Each intent has its created, processing and outcome events, in order, all published
    (and, with a tap, all received from the events exchange)."""
    deadline = time.monotonic() + 30
    while await db.fetchval(
            "SELECT count(*) FROM events WHERE account_id = $1 AND published_at IS NULL",
            account_id):
        assert time.monotonic() < deadline, "events left unpublished"
        await asyncio.sleep(0.1)
    rows = await db.fetch("SELECT id, type, data FROM events WHERE account_id = $1 ORDER BY seq",
                          account_id)
    by_intent: dict[str, list[str]] = {}
    for row in rows:
        obj = row["data"]
        intent_id = obj["id"] if obj["object"] == "payment_intent" else obj["payment_intent"]
        by_intent.setdefault(intent_id, []).append(row["type"])
    assert by_intent == {i: EXPECTED_EVENTS[card] for i, card in cards.items()}
    if tap is not None:
        await tap.receive({r["id"] for r in rows})


async def test_kill_9_mid_flight_loses_nothing(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    settings = make_settings(psp_latency_ms=(300, 900), psp_lease_s=2.0,
                             processor_metrics_port=free_port())
    amounts = Amounts(60)
    async with stack(settings, processor=False) as s, EventTap(settings).bound() as tap:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        await relay_lock_free(s.db)
        cards: dict[str, str] = {}

        async def batch(n: int) -> None:
            chosen = [DECLINED if i % 3 == 0 else VISA for i in range(n)]
            made = await asyncio.gather(*(
                create(api, amounts.take(), card, confirm_separately=i % 2 == 1)
                for i, card in enumerate(chosen)))
            cards.update(zip(made, chosen, strict=True))

        proc = await start_processor(settings, procs, tmp_path)
        await batch(40)
        await asyncio.sleep(0.3)
        proc.kill()
        # The kill must land mid-flight for this test to mean anything.
        assert await unsettled(s.db, api.account_id, len(cards)) > 0

        # Accepted while no processor runs: queued, applied later.
        await batch(10)
        proc = await start_processor(settings, procs, tmp_path)
        await asyncio.sleep(0.5)
        proc.kill()
        assert await unsettled(s.db, api.account_id, len(cards)) > 0

        await start_processor(settings, procs, tmp_path)
        intents = await wait_settled(s.db, api.account_id, len(cards))
        check_outcomes(intents, cards)
        await check_ledger(s.db, api.account_id, amounts, since, dict.fromkeys(cards, 1))
        await check_events(s.db, api.account_id, cards, tap)


async def start_processor(settings: Settings, procs: list[Proc], tmp_path: Path,
                          **env: str) -> LoggedProc:
    return await start_proc("processor", settings, procs, tmp_path, **env)


async def test_crash_after_psp_charged_before_recorded(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    settings = make_settings(psp_lease_s=1.0, processor_metrics_port=free_port())
    amounts = Amounts(1)
    async with stack(settings, processor=False) as s:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        doomed = await start_processor(settings, procs, tmp_path,
                                       PAYONCE_FAILPOINTS="processor.after_psp_call")
        intent_id = await create(api, amounts.take(), VISA, confirm_separately=False)
        assert await doomed.wait_exit(20) == 137
        # The PSP charged; payonce recorded nothing of it.
        attempt = await s.db.fetchrow(
            "SELECT * FROM payment_attempts WHERE payment_intent_id = $1", intent_id)
        assert attempt["result"] is None and attempt["state"] == "pending"
        charged = await s.db.fetchrow("SELECT * FROM psp.charges WHERE idempotency_key = $1",
                                      attempt["psp_key"])
        assert charged["outcome"] == "captured"
        assert (await s.db.fetchval("SELECT status FROM payment_intents WHERE id = $1",
                                    intent_id)) == "processing"

        survivor = await start_processor(settings, procs, tmp_path)
        intents = await wait_settled(s.db, api.account_id, 1, within_s=30)
        check_outcomes(intents, {intent_id: VISA})
        attempts = await check_ledger(s.db, api.account_id, amounts, since, {intent_id: 1})
        # The answer recorded is the first charge's: the retry was deduped by the PSP key.
        assert attempts[0]["authorization_code"] == charged["authorization_code"]
        assert "psp replayed a charge" in survivor.log()


async def test_edge_killed_between_publish_and_response(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    settings = make_settings(idempotency_lock_ms=1000, edge_port=free_port())
    async with stack(settings, processor=False) as s:
        local = await s.client()
        key = str(uuid.uuid4())
        params = form({"amount": 3100, "currency": "usd", "payment_method": VISA,
                       "confirm": True})
        edge = await start_proc("edge", settings, procs, tmp_path,
                                PAYONCE_FAILPOINTS="edge.after_publish")
        api = Client(s.session, f"http://127.0.0.1:{settings.edge_port}", {
            "account": local.account_id, "secret_key": local.secret_key,
            "publishable_key": local.publishable_key}, s.db)
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.post("/v1/payment_intents", params, key=key)
        assert await edge.wait_exit(10) == 137

        settings = settings.with_(edge_port=free_port())
        await start_proc("edge", settings, procs, tmp_path)
        api.base_url = f"http://127.0.0.1:{settings.edge_port}"
        # As a Stripe client does: a 409 (key still locked by the dead request) is retried.
        async with asyncio.timeout(20):
            while (retry := await api.post("/v1/payment_intents", params, key=key)).status == 409:
                assert retry.error["code"] == "idempotency_key_in_use"
                await asyncio.sleep(0.2)
        assert retry.status == 202, retry.body
        intent_id = ids.intent_id(settings.secret_bytes, api.account_id, key)
        assert retry.body["id"] == intent_id

        # Both copies of the command are queued now; the processor applies one.
        await s.start_processor()
        done = await api.wait_for(intent_id)
        assert done["status"] == "succeeded"
        again = await api.post("/v1/payment_intents", params, key=key)
        assert again.status == 202 and again.body["id"] == intent_id
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await s.db.fetchval("SELECT count(*) FROM payment_intents WHERE account_id = $1",
                                   api.account_id) == 1
        assert await s.db.fetchval("SELECT count(*) FROM inbox WHERE account_id = $1",
                                   api.account_id) == 1
        assert await s.db.fetchval(
            "SELECT count(*) FROM payment_attempts WHERE account_id = $1", api.account_id) == 1


async def test_psp_errors_timeouts_and_lost_replies(
    migrated: None, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        psp_error_rate=0.2, psp_timeout_rate=0.2, psp_lost_reply_rate=0.25, psp_timeout_s=0.3,
        # Eight tries (the default) would leave about one attempt in 1,500 that never reached
        # the PSP, correctly failed with processing_error but with no ledger row; twelve make
        # that 0.4**12, so every attempt here must end with exactly one authorization.
        psp_max_tries=12)
    amounts = Amounts(30)
    caplog.set_level("INFO", logger="processor")
    async with stack(settings) as s:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        chosen = [DECLINED if i % 3 == 0 else VISA for i in range(amounts.count)]
        made = await asyncio.gather(*(
            create(api, amounts.take(), card, confirm_separately=False) for card in chosen))
        cards = dict(zip(made, chosen, strict=True))
        intents = await wait_settled(s.db, api.account_id, len(cards), within_s=90)
        # A lost reply retried must bring back the committed answer, never a processing_error.
        check_outcomes(intents, cards)
        await check_ledger(s.db, api.account_id, amounts, since, dict.fromkeys(cards, 1))
    messages = [r.getMessage() for r in caplog.records]
    # The faults did happen: 503s, timeouts, and charges replayed after a lost reply.
    assert "psp unavailable; retrying" in messages
    assert "psp timed out; retrying with the same key" in messages
    assert "psp replayed a charge" in messages
