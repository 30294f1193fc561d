"""Attempts made claimed for their processor's runner (processor/batches.py, INSERT_ATTEMPTS):
the runner starts one from the row it is handed, without a claim of its own; a row that waited
too long for a slot has its lease renewed first, unless another runner took it meanwhile; rows
it will not start (its waiting list full, or it is stopping) get their leases back at once, for
the sweeper."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from contracts import ids
from ops.accounts import create_account
from ops.postgres import Database
from processor.attempts import AttemptRunner
from processor.psp import PSPResult
from tests.conftest import make_settings, stack
from tests.test_lock_order import INSERT_INTENT

EXCHANGE = "payonce.claimed_attempts"
# As a confirm's transaction makes it: leased for 30 s, its first try counted.
INSERT_CLAIMED = """
INSERT INTO payment_attempts (id, account_id, payment_intent_id, charge_id, psp_key, amount,
                              currency, payment_method, commands_exchange, locked_until, tries)
VALUES ($1, $2, $3, $4, $5, 1000, 'usd', 'pm_card_visa', $6, now() + interval '30 s', 1)
RETURNING *
"""


class PSP:
    """Answers every charge, once `open` is set."""

    def __init__(self) -> None:
        self.charged: list[str] = []
        self.open = asyncio.Event()
        self.open.set()

    async def charge(self, psp_key: str, **_: Any) -> PSPResult:
        await self.open.wait()
        self.charged.append(psp_key)
        return PSPResult(True, authorization_code="424242")


class Publisher:
    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish(self, command: Any, *, timeout_s: float) -> None:
        self.published.append(command.attempt_id)


class Runner(AttemptRunner):
    """Counts the claims it makes."""

    claims: list[str]

    async def _claim_many(self, rows: list[tuple[str, Any]]) -> dict[str, Any]:
        self.claims.extend(i for i, _ in rows)
        return await super()._claim_many(rows)


@pytest.fixture
async def db(migrated: None) -> AsyncIterator[Database]:
    async with stack(processor=False, edge=False) as s:
        yield s.db


def runner_for(db: Database, psp: PSP, publisher: Publisher, **settings: Any) -> Runner:
    runner = Runner(db, psp, publisher,  # type: ignore[arg-type]
                    make_settings(**settings), EXCHANGE)
    runner.claims = []
    return runner


async def claimed_rows(db: Database, count: int) -> list[Any]:
    async with db.acquire() as conn:
        account = (await create_account(conn, "claimed attempts"))["account"]
        rows = []
        for _ in range(count):
            intent = ids.random_id("pi", 24)
            await conn.execute(INSERT_INTENT, intent, account)
            attempt = ids.random_id("pa", 24)
            rows.append(await conn.fetchrow(
                INSERT_CLAIMED, attempt, account, intent, ids.random_id("ch", 24),
                f"payonce_{attempt}", EXCHANGE))
        return rows


async def states(db: Database, rows: list[Any]) -> dict[str, tuple[str, bool, int]]:
    """Each row's state, whether it holds a lease, and its tries."""
    found = await db.fetch(
        "SELECT id, state, locked_until IS NOT NULL AS leased, tries FROM payment_attempts "
        "WHERE id = ANY($1::text[])", [r["id"] for r in rows])
    return {r["id"]: (r["state"], r["leased"], r["tries"]) for r in found}


async def not_leased(db: Database, rows: list[Any]) -> bool:
    return all(not leased for _, leased, _ in (await states(db, rows)).values())


async def until(condition: Any, within_s: float = 10.0) -> None:
    async with asyncio.timeout(within_s):
        while not await condition():
            await asyncio.sleep(0.02)


async def test_a_claimed_row_is_run_without_a_claim(db: Database) -> None:
    psp, publisher = PSP(), Publisher()
    runner = runner_for(db, psp, publisher)
    rows = await claimed_rows(db, 3)
    runner.kick([], rows)
    made = [r["id"] for r in rows]

    async def reported() -> bool:
        return set((await states(db, rows)).values()) == {("reported", False, 1)}

    await until(reported)
    assert runner.claims == []
    assert sorted(psp.charged) == sorted(f"payonce_{i}" for i in made)
    assert sorted(publisher.published) == sorted(made)
    await runner.stop(5.0)


async def test_a_claimed_row_that_waited_too_long_has_its_lease_renewed(db: Database) -> None:
    psp, publisher = PSP(), Publisher()
    runner = runner_for(db, psp, publisher)
    [row] = await claimed_rows(db, 1)
    # Handed over longer ago than its lease leaves room for a PSP call.
    runner._waiting[row["id"]] = (row, time.monotonic() - runner._claimed_fresh_s)
    runner._fill()

    async def reported() -> bool:
        return (await states(db, [row]))[row["id"]][0] == "reported"

    await until(reported)
    # Its lease was renewed in place, counting a try; no claim of the due rows was needed.
    assert runner.claims == []
    assert (await states(db, [row]))[row["id"]] == ("reported", False, 2)
    assert psp.charged == [f"payonce_{row['id']}"]
    await runner.stop(5.0)


async def test_a_claimed_row_another_runner_took_is_left_to_it(db: Database) -> None:
    psp, publisher = PSP(), Publisher()
    runner = runner_for(db, psp, publisher)
    [row] = await claimed_rows(db, 1)
    # Its lease ran out while it waited here, and another runner claimed it.
    taken = await db.fetchrow(
        "UPDATE payment_attempts SET locked_until = now() + interval '30 s', tries = 2 "
        "WHERE id = $1 RETURNING locked_until", row["id"])
    runner._waiting[row["id"]] = (row, time.monotonic() - runner._claimed_fresh_s)
    runner._fill()
    await asyncio.gather(*runner._running.values())
    assert psp.charged == [] and publisher.published == []
    after = await db.fetchrow("SELECT state, locked_until, tries FROM payment_attempts "
                              "WHERE id = $1", row["id"])
    assert (after["state"], after["locked_until"], after["tries"]) == (
        "pending", taken["locked_until"], 2)
    await runner.stop(5.0)


async def test_claimed_rows_not_started_get_their_leases_back(db: Database) -> None:
    psp, publisher = PSP(), Publisher()
    psp.open.clear()
    # One PSP slot and four places in the waiting list.
    runner = runner_for(db, psp, publisher, psp_concurrency=1)
    rows = await claimed_rows(db, 7)
    runner.kick([], rows)
    # Four fill the waiting list, and the first of them runs (held at the PSP); the other
    # three are left to the sweeper.
    await until(lambda: not_leased(db, rows[4:]))
    held = await states(db, rows[:4])
    assert all(leased for _, leased, _ in held.values()), held
    # Stopping gives back the leases of the rows still waiting; the one at the PSP is left to
    # finish its call.
    stopping = asyncio.create_task(runner.stop(5.0))
    await until(lambda: not_leased(db, rows[1:4]))
    psp.open.set()
    await stopping
    final = await states(db, rows)
    assert final[rows[0]["id"]] == ("reported", False, 1)
    assert [final[r["id"]] for r in rows[1:]] == [("pending", False, 1)] * 6
    assert runner.claims == [] and psp.charged == [f"payonce_{rows[0]['id']}"]
