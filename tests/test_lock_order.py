"""Statements that change several rows of PSP work lock them in id order, whatever order
their ids come in and whatever plan PostgreSQL picks. The runners' coalesced claims and
reports (which store results) run beside a batch of commands that settles the same rows: in
any other order two of them can each hold a row the other waits for, and PostgreSQL fails one
as a deadlock."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from contracts import ids
from ops.accounts import create_account
from processor.attempts import ATTEMPTS_SQL
from processor.batches import SETTLE_ATTEMPTS
from tests.conftest import make_settings

INSERT_INTENT = """
INSERT INTO payment_intents (id, account_id, amount, currency, status, payment_method, created)
VALUES ($1, $2, 1000, 'usd', 'processing', 'pm_card_visa', now())
"""
INSERT_ATTEMPT = """
INSERT INTO payment_attempts (id, account_id, payment_intent_id, charge_id, psp_key, amount,
                              currency, payment_method, commands_exchange, result)
VALUES ($1, $2, $3, $4, $5, 1000, 'usd', 'pm_card_visa', 'payonce.lock_order', $6)
"""


def attempt_id(first: str) -> str:
    """A random attempt id that sorts by its first character."""
    return f"pa_{first}{ids.random_id('pa', 23)[3:]}"


@pytest.fixture
async def conns(migrated: None) -> AsyncIterator[list[Any]]:
    url = make_settings().database_url
    opened = [await asyncpg.connect(url) for _ in range(3)]
    try:
        yield opened
    finally:
        for conn in opened:
            await conn.close()


async def rows(conn: Any, result: str | None) -> tuple[str, str]:
    """Two pending attempts of one intent, the higher id stored first: a plan that reads the
    heap in its order meets that one first."""
    account = await create_account(conn, "lock order")
    intent = ids.random_id("pi", 24)
    await conn.execute(INSERT_INTENT, intent, account["account"])
    low, high = attempt_id("A"), attempt_id("B")
    for attempt in (high, low):
        await conn.execute(INSERT_ATTEMPT, attempt, account["account"], intent,
                           ids.random_id("ch", 24), secrets.token_hex(8), result)
    return low, high


async def waiting_on_a_lock(conn: Any, pid: int) -> None:
    async with asyncio.timeout(10):
        while await conn.fetchval(
                "SELECT wait_event_type IS DISTINCT FROM 'Lock' FROM pg_stat_activity "
                "WHERE pid = $1", pid):
            await asyncio.sleep(0.01)


# The statement, the result its rows start with, and its arguments after the ids.
STATEMENTS: dict[str, tuple[str, str | None, tuple[Any, ...]]] = {
    "claim": (ATTEMPTS_SQL.claim, None, (5.0,)),
    "report": (ATTEMPTS_SQL.report, None, (["{}", "{}"],)),
    "settle": (SETTLE_ATTEMPTS, "{}", ()),
}


@pytest.mark.parametrize("name", STATEMENTS)
@pytest.mark.parametrize("index_scans", [True, False])
async def test_rows_are_locked_in_id_order(conns: list[Any], name: str,
                                           index_scans: bool) -> None:
    holder, runner, prober = conns
    query, result, args = STATEMENTS[name]
    low, high = await rows(holder, result)
    if not index_scans:
        # The plan of a larger batch: a bitmap or sequential scan, rows in heap order.
        await runner.execute("SET enable_indexscan = off")
    holding = holder.transaction()
    await holding.start()
    await holder.execute("SELECT 1 FROM payment_attempts WHERE id = $1 FOR UPDATE", high)
    # The ids in the other order: the statement still takes the lower one first, then waits.
    running = asyncio.create_task(runner.fetch(query, [high, low], *args))
    try:
        await waiting_on_a_lock(prober, runner.get_server_pid())
        with pytest.raises(asyncpg.LockNotAvailableError):
            await prober.execute(
                "SELECT 1 FROM payment_attempts WHERE id = $1 FOR UPDATE NOWAIT", low)
    finally:
        await holding.rollback()
        changed = await running
    assert {r["id"] for r in changed} <= {low, high}
