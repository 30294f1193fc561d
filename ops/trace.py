"""`payonce trace pi_…`: one payment's life, in order, from the database: the commands
accepted for it, its transitions, its PSP calls (attempts, and the tasks that capture, void or
reverse what they authorized) and their results, its events and their webhook deliveries
(ops/timeline.py gathers them, for the API's timeline too). The same ids are in every log
line (edge, processor, dispatcher), so the logs of any of these steps are one `grep` away."""

from __future__ import annotations

from ops import timeline
from ops.postgres import connect
from ops.timeline import Entry, render

__all__ = ["render", "trace"]


async def trace(database_url: str, intent_id: str, *, timeout_s: float) -> list[Entry]:
    conn = await connect(database_url, timeout_s=timeout_s)
    try:
        return await timeline.gather(conn, intent_id)
    finally:
        await conn.close()
