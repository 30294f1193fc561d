"""`payonce trace` tells one payment's life in order, from the database."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from tests.conftest import Client, Stack, settings_env
from tests.lifecycle_support import authorized, settled
from tests.support import VISA, create


async def test_a_payment_told_in_order(api: Client, shared: Stack) -> None:
    intent_id = await create(api, 4321, VISA, confirm_separately=True)
    await api.wait_for(intent_id, ["succeeded"])
    async with asyncio.timeout(20):
        while await api.db.fetchval(
                "SELECT count(*) FROM events e JOIN events_outbox o ON o.seq = e.seq "
                "WHERE e.object_id = $1", intent_id):
            await asyncio.sleep(0.1)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ops.cli", "trace", intent_id],
        env=settings_env(shared.settings), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    kinds = [line.split()[1] for line in lines]
    text = done.stdout
    # Accepted commands (create, then confirm), the attempt and its PSP call, the events with
    # their transitions, in the order they happened.
    assert kinds.count("command") == 2 and "payment_intent.create applied" in text
    assert "payment_intent.confirm applied" in text
    assert "psp" in kinds and ": captured" in text
    assert "settled after 1 tries: authorized" in text
    assert "payment_intent.processing (requires_confirmation → processing), published" in text
    assert "payment_intent.succeeded (processing → succeeded), published" in text
    order = [text.index(s) for s in ("payment_intent.create applied",
                                     "payment_intent.confirm applied", ": captured",
                                     "payment_intent.succeeded")]
    assert order == sorted(order)
    missing = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ops.cli", "trace", "pi_" + "0" * 24],
        env=settings_env(shared.settings), capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "nothing is known" in missing.stderr


async def test_a_capture_told_with_its_psp_task(api: Client, shared: Stack) -> None:
    intent = await authorized(api, 1234)
    assert (await api.post(f"/v1/payment_intents/{intent['id']}/capture")).status == 202
    await settled(api, intent["id"], "succeeded")
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ops.cli", "trace", intent["id"]],
        env=settings_env(shared.settings), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "payment_intent.capture applied" in text
    assert "capture of 1234, psp key payonce_pt_" in text
    assert ": capture done" in text and "settled after 1 tries: succeeded" in text
    order = [text.index(s) for s in ("payment_intent.capture applied", "capture of 1234",
                                     ": capture done", "charge.captured")]
    assert order == sorted(order)


async def test_a_refund_is_part_of_the_story(api: Client, shared: Stack) -> None:
    intent_id = await create(api, 1234, VISA, confirm_separately=False)
    await api.wait_for(intent_id, ["succeeded"])
    accepted = await api.post("/v1/refunds", {"payment_intent": intent_id, "amount": "234"})
    assert accepted.status == 202, accepted.body
    refund_id = accepted.body["id"]
    async with asyncio.timeout(20):
        while await api.db.fetchval("SELECT status FROM refunds WHERE id = $1",
                                    refund_id) != "succeeded":
            await asyncio.sleep(0.1)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ops.cli", "trace", intent_id],
        env=settings_env(shared.settings), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "refund.create applied" in text
    assert f"{refund_id} of 234 psp key payonce_{refund_id}" in text
    assert ": refund succeeded" in text
    assert f"{refund_id} succeeded, task settled" in text
    assert "charge.refunded" in text
    order = [text.index(s) for s in ("payment_intent.succeeded", "refund.create applied",
                                     "refund.created", ": refund succeeded",
                                     "refund.updated (pending → succeeded)")]
    assert order == sorted(order), text
