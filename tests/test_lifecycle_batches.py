"""Lifecycle commands queued together are applied in batches, each with its own outcome:
captures, cancels and updates of many intents in one transaction, then their PSP tasks'
results, again together."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from tests.conftest import form, make_settings, stack
from tests.lifecycle_support import authorized, books, charge_of, expect, settled


def batched() -> tuple[float, float]:
    """(batches applied, commands in them) so far."""
    return (REGISTRY.get_sample_value("payonce_processor_batches_total",
                                      {"outcome": "applied"}) or 0.0,
            REGISTRY.get_sample_value("payonce_processor_batch_commands_sum") or 0.0)


async def test_lifecycle_commands_queued_together(migrated: None) -> None:
    async with stack(make_settings(partitions=1)) as s:
        api = await s.client()
        held = await asyncio.gather(*(authorized(api, 1000 + i) for i in range(12)))
        plain = await asyncio.gather(*(api.create(amount=700, currency="usd",
                                                  metadata={"a": "1"}) for _ in range(6)))
        plain_ids = [expect(p)["id"] for p in plain]
        for intent_id in plain_ids:
            await settled(api, intent_id, "requires_payment_method")
        await s.stop_processor()

        captures, cancels = held[:6], held[6:]
        accepted = await asyncio.gather(
            *(api.post(f"/v1/payment_intents/{i['id']}/capture",
                       {"amount_to_capture": str(500 + n)}) for n, i in enumerate(captures)),
            *(api.post(f"/v1/payment_intents/{i['id']}/cancel") for i in cancels),
            *(api.post(f"/v1/payment_intents/{i}", form({
                "amount": 900, "metadata": {"a": "", "b": "2"},
                "payment_method": "pm_card_visa"})) for i in plain_ids))
        assert all(r.status == 202 for r in accepted), [r.body for r in accepted]
        before = batched()
        await s.start_processor()

        for n, intent in enumerate(captures):
            done = await settled(api, intent["id"], "succeeded")
            assert done["amount_received"] == 500 + n
            charge = await charge_of(api, intent["id"])
            assert charge["amount_refunded"] == intent["amount"] - (500 + n)
            [book] = await books(api, intent["id"])
            assert (list(book["kinds"]), book["captured_later"]) == (["capture"], 500 + n)
        for intent in cancels:
            await settled(api, intent["id"], "canceled")
            [book] = await books(api, intent["id"])
            assert (list(book["kinds"]), book["voided"]) == (["void"], intent["amount"])
        for intent_id in plain_ids:
            done = await settled(api, intent_id, "requires_confirmation")
            assert (done["amount"], done["metadata"], done["payment_method"]) == \
                (900, {"b": "2"}, "pm_card_visa")
        # 18 commands and 12 task results, in fewer batches than commands: the 18 queued
        # before the processor started went together.
        batches, commands = (after - first for after, first in zip(batched(), before,
                                                                    strict=True))
        assert commands >= 30 and batches < commands, (batches, commands)
