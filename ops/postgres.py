"""PostgreSQL access: a pool whose every call is bounded in time, jsonb decoded by orjson, and
the one classification of errors into "the database is unavailable, retry" and the rest.

A half-open connection (a failover, a paused server, a dropped route) would otherwise hang a
request forever: it would exhaust the pool and outlive the Idempotency-Key's lock. So every
statement has a timeout (`command_timeout`), every connection attempt too, and so does waiting
for a free connection in the pool, which asyncpg's own `pool.fetch*` helpers do not bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson

# SQLSTATE classes and codes that say the database (or the way to it) is unavailable for a
# moment, not that the statement is wrong: connection exceptions (08), insufficient resources
# (53), admin/crash shutdown and "cannot connect now" (57P01-57P03), a statement cancelled by
# its timeout (57014), and serialization failures and deadlocks (40), which a retry resolves.
_TRANSIENT_CLASSES = ("08", "53", "40")
_TRANSIENT_CODES = ("57P01", "57P02", "57P03", "57014")


def is_transient(exc: BaseException) -> bool:
    """True for errors a later retry can clear: the database is restarting, unreachable,
    overloaded or too slow, or the transaction lost a race."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_CODES
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed" and friends; not the client-side errors that are bugs.
        return not isinstance(exc, ValueError | asyncpg.exceptions.UnsupportedClientFeatureError)
    return isinstance(exc, OSError | TimeoutError)


async def _init(conn: Any) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


async def _keep(conn: Any) -> None:
    """Pooled connections hold no session state (no LISTEN, advisory locks or SET: those live
    on dedicated connections), so the reset asyncpg runs on every release, a round trip each
    time, is skipped."""


class Database:
    """An asyncpg pool with a bound on every wait: statements, connects and acquires."""

    def __init__(self, pool: Any, timeout_s: float, acquire_timeout_s: float) -> None:
        self.pool = pool
        self.timeout_s = timeout_s
        self.acquire_timeout_s = acquire_timeout_s

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            yield conn

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        async with self.acquire() as conn:
            return list(await conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.acquire() as conn:
            return str(await conn.execute(query, *args))

    async def close(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.pool.close()
        except TimeoutError:
            # A connection stuck on an unresponsive server would hold close() forever.
            self.pool.terminate()


async def create_pool(
    url: str, *, timeout_s: float, acquire_timeout_s: float | None = None, min_size: int = 2,
    max_size: int = 10,
) -> Database:
    """A pool whose statements and connects give up after `timeout_s`, and whose callers
    wait at most `acquire_timeout_s` (default: `timeout_s`) for a free connection."""
    pool = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, init=_init, reset=_keep,
        command_timeout=timeout_s, timeout=timeout_s)
    return Database(pool, timeout_s, timeout_s if acquire_timeout_s is None else acquire_timeout_s)


async def connect(url: str, *, timeout_s: float) -> Any:
    """A single connection with the same codecs and timeouts as the pool's."""
    conn = await asyncpg.connect(url, timeout=timeout_s, command_timeout=timeout_s)
    await _init(conn)
    return conn
