"""The updates that come most often change no indexed column, on tables that keep room on
their pages, so PostgreSQL can make them HOT (a new row version on the same page, no index
touched): the lease protocol's claims, renewals and releases, and the dispatcher's claims and
releases of webhook deliveries (ops/migrations/0016_hot_updates.sql). The sweep of reported
results reads `reported_at`, which only the statement that stores a result and marks its row
reported sets."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from processor import webhooks
from processor.attempts import ATTEMPTS_SQL, MAX_REPORTS, LeaseSQL
from processor.psp_tasks import TASKS_SQL
from processor.refund_tasks import REFUNDS_SQL
from tests.conftest import make_settings, stack
from tests.support import VISA, create, wait_settled

# The columns an index reads: its keys, and those its expressions and predicate name.
INDEXED = r"""
SELECT DISTINCT a.attname
FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum > 0 AND NOT a.attisdropped
WHERE i.indrelid = $1::regclass
  AND (a.attnum = ANY(i.indkey::int2[])
       OR coalesce(pg_get_expr(i.indexprs, i.indrelid), '') ~ ('\m' || a.attname || '\M')
       OR coalesce(pg_get_expr(i.indpred, i.indrelid), '') ~ ('\m' || a.attname || '\M'))
"""
FILLFACTOR = "SELECT reloptions FROM pg_class WHERE oid = $1::regclass"


def assigned(sql: str) -> set[str]:
    """The columns the (one) UPDATE of `sql` sets."""
    found = re.search(r"\bSET\b(.*?)\s(?:FROM|WHERE)\b", sql, re.S)
    assert found, sql
    return set(re.findall(r"(?:^|,)\s*(\w+)\s*=(?!>)", found.group(1)))


def lease_updates(sql: LeaseSQL) -> list[str]:
    return [sql.claim, sql.reclaim, sql.renew, sql.release]


FREQUENT: dict[str, list[str]] = {
    "payment_attempts": lease_updates(ATTEMPTS_SQL),
    "psp_tasks": lease_updates(TASKS_SQL),
    "refunds": lease_updates(REFUNDS_SQL),
    "webhook_deliveries": [webhooks.CLAIM, webhooks.RELEASE],
}


def test_assigned_reads_the_set_clause() -> None:
    assert assigned(ATTEMPTS_SQL.renew) == {"locked_until", "tries", "updated_at"}
    assert assigned(ATTEMPTS_SQL.report) == {"result", "state", "locked_until", "reported_at",
                                             "updated_at"}
    assert assigned(ATTEMPTS_SQL.claim) == {"locked_until", "tries", "updated_at"}
    assert assigned(webhooks.CLAIM) == {"locked_until", "updated_at", "attempts"}


@pytest.mark.parametrize("table", sorted(FREQUENT))
async def test_frequent_updates_change_no_indexed_column(migrated: None, table: str) -> None:
    conn = await asyncpg.connect(make_settings().database_url)
    try:
        indexed = {r["attname"] for r in await conn.fetch(INDEXED, table)}
        options = await conn.fetchval(FILLFACTOR, table) or []
    finally:
        await conn.close()
    assert "id" in indexed  # the query sees the keys
    for sql in FREQUENT[table]:
        changed = assigned(sql)
        assert changed and not changed & indexed, (table, sorted(changed & indexed), sql)
    fillfactor = [int(o.split("=")[1]) for o in options if o.startswith("fillfactor=")]
    assert fillfactor and fillfactor[0] < 100, options


@asynccontextmanager
async def rolled_back(conn: Any) -> AsyncIterator[None]:
    tx = conn.transaction()
    await tx.start()
    try:
        yield
    finally:
        await tx.rollback()


async def swept(conn: Any, attempt_id: str, exchange: str, *, reported_at: str,
                updated_at: str) -> bool:
    """Whether the sweep reports the attempt again, once marked reported at these times (an
    hour ago or now), inside a transaction that is rolled back."""
    async with rolled_back(conn):
        await conn.execute(
            "UPDATE payment_attempts SET state = 'reported', reports = 0, "
            f"reported_at = {reported_at}, updated_at = {updated_at} WHERE id = $1", attempt_id)
        again = await conn.fetch(ATTEMPTS_SQL.rereport, exchange, MAX_REPORTS, 60.0, 500)
        return attempt_id in {r["id"] for r in again}


async def test_the_sweep_reads_when_a_result_was_reported(migrated: None) -> None:
    async with stack() as s:
        api = await s.client()
        intent_id = await create(api, 1500, VISA, confirm_separately=False)
        await wait_settled(s.db, api.account_id, 1)
        row = await s.db.fetchrow(
            "SELECT id, commands_exchange FROM payment_attempts WHERE payment_intent_id = $1",
            intent_id)
        hour_ago = "now() - interval '1 hour'"
        async with s.db.acquire() as conn:
            # Storing its result marks it reported, and sets the time.
            async with rolled_back(conn):
                await conn.execute("UPDATE payment_attempts SET state = 'pending', "
                                   "reported_at = NULL WHERE id = $1", row["id"])
                await conn.execute(ATTEMPTS_SQL.report, [row["id"]], ["{}"])
                marked = await conn.fetchrow(
                    "SELECT state, reported_at = now() AS now FROM payment_attempts "
                    "WHERE id = $1", row["id"])
                assert (marked["state"], marked["now"]) == ("reported", True)
            args = (conn, row["id"], row["commands_exchange"])
            # A later update of the row (its lease, say) does not put the sweep off...
            assert await swept(*args, reported_at=hour_ago, updated_at="now()")
            # ...and a fresh report is left alone, however old the row's last update.
            assert not await swept(*args, reported_at="now()", updated_at=hour_ago)
            # Marked reported by a processor from before reported_at: its update time counts.
            assert await swept(*args, reported_at="NULL", updated_at=hour_ago)
            assert not await swept(*args, reported_at="NULL", updated_at="now()")
