"""The asyncpg pool, with jsonb decoded by orjson."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson


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


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 10) -> Any:
    return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init,
                                     reset=_keep)


async def connect(url: str) -> Any:
    """A single connection with the same codecs as the pool's."""
    conn = await asyncpg.connect(url)
    await _init(conn)
    return conn
