"""Different intents run concurrently; the commands of one intent run in order."""

from __future__ import annotations

import asyncio
import time

from tests.conftest import Client, form, make_settings, stack
from tests.support import VISA, wait_settled

# 200 PSP calls of 2 s each take 400 s one at a time. The bound is the issue's: generous for
# concurrent processing on a small machine, far below what a serial path would need.
INTENTS = 200
SETTLE_BOUND_S = 60.0


async def test_slow_psp_does_not_serialize_intents(migrated: None) -> None:
    settings = make_settings(psp_latency_ms=(2000, 2000), psp_timeout_s=10.0, psp_lease_s=15.0)
    async with stack(settings) as s:
        api = await s.client()
        started = time.monotonic()
        created = await asyncio.gather(*(
            api.create(amount=1000 + i, currency="usd", payment_method=VISA, confirm=True)
            for i in range(INTENTS)))
        assert [c.status for c in created] == [202] * INTENTS
        left = SETTLE_BOUND_S - (time.monotonic() - started)
        intents = await wait_settled(s.db, api.account_id, INTENTS, within_s=left)
        assert {r["status"] for r in intents.values()} == {"succeeded"}


async def create_then_confirm(api: Client, amount: int) -> str:
    """Create, then confirm the moment the create is accepted, without waiting for it."""
    created = await api.post("/v1/payment_intents", form(
        {"amount": amount, "currency": "usd", "payment_method": VISA}))
    assert created.status == 202, created.body
    confirmed = await api.post(f"/v1/payment_intents/{created.body['id']}/confirm")
    assert confirmed.status == 202, confirmed.body
    return str(created.body["id"])


INBOX = """
SELECT object_id, command, outcome, error FROM inbox WHERE account_id = $1
ORDER BY applied_at
"""


async def test_commands_of_one_intent_apply_in_order(migrated: None) -> None:
    # A PSP slow enough that many attempts are under way while other intents' commands run.
    settings = make_settings(psp_latency_ms=(300, 800))
    async with stack(settings, processor=False) as s:
        api = await s.client()
        # Queued before any processor runs: each partition consumer then gets its commands in
        # large prefetched batches, where a create and its confirm sit side by side.
        queued = await asyncio.gather(*(create_then_confirm(api, 100 + i) for i in range(100)))
        await s.start_processor()
        # And while it runs, with PSP calls for the first ones under way.
        live = await asyncio.gather(*(create_then_confirm(api, 300 + i) for i in range(100)))
        intent_ids = set(queued) | set(live)
        assert len(intent_ids) == 200
        intents = await wait_settled(s.db, api.account_id, len(intent_ids))
        assert {r["status"] for r in intents.values()} == {"succeeded"}
        inbox = await s.db.fetch(INBOX, api.account_id)
        assert [r["error"] for r in inbox if r["outcome"] != "applied"] == []
        commands: dict[str, list[str]] = {}
        for row in inbox:
            commands.setdefault(row["object_id"], []).append(row["command"])
        in_order = ["payment_intent.create", "payment_intent.confirm"]
        assert commands == {intent_id: in_order for intent_id in intent_ids}
