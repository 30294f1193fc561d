"""PSP tasks survive crashes: a processor killed right after the PSP captured, before anything
of the answer was stored, leaves the task to another processor, which asks again with the same
key; the PSP answers what it did, and captured once."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Proc, free_port, make_settings, stack
from tests.lifecycle_support import VISA, books, expect, settled
from tests.support import start_processor


async def test_kill_after_the_psp_captured(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    settings = make_settings(processor_metrics_port=free_port())
    async with stack(settings, processor=False) as s:
        api = await s.client()
        first = await start_processor(settings, procs, tmp_path)
        created = expect(await api.create(amount=4100, currency="usd", payment_method=VISA,
                                          confirm=True, capture_method="manual"))
        await settled(api, created["id"], "requires_capture")
        assert await first.sigterm(20) == 0

        # Armed for PSP tasks only: the authorization above went through.
        doomed = await start_processor(settings, procs, tmp_path,
                                       PAYONCE_FAILPOINTS="processor.after_psp_call=psp_task")
        expect(await api.post(f"/v1/payment_intents/{created['id']}/capture",
                              {"amount_to_capture": "4000"}))
        assert await doomed.wait_exit(20) == 137
        task = await s.db.fetchrow("SELECT * FROM psp_tasks WHERE payment_intent_id = $1",
                                   created["id"])
        assert (task["kind"], task["state"], task["result"]) == ("capture", "pending", None)
        [book] = await books(api, created["id"])
        assert (list(book["kinds"]), book["captured_later"]) == (["capture"], 4000)

        survivor = await start_processor(settings, procs, tmp_path)
        done = await settled(api, created["id"], "succeeded")
        assert done["amount_received"] == 4000
        [book] = await books(api, created["id"])
        assert (list(book["kinds"]), book["captured_later"]) == (["capture"], 4000)
        assert "psp replayed an operation" in survivor.log()
