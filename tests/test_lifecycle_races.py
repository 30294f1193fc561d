"""Captures and cancels racing on one intent, many at once, with and without the same
Idempotency-Key: whatever wins, the intent ends in one consistent outcome and the PSP's books
agree with it (never two captures, never captured and voided)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from tests.conftest import Client, Reply
from tests.lifecycle_support import authorized, books, charge_of, expect, settled


async def outcome(api: Client, intent_id: str) -> dict[str, Any]:
    """The intent at rest, checked against its charge and the PSP's books."""
    done = await settled(api, intent_id, ("succeeded", "canceled"))
    charge = await charge_of(api, intent_id)
    [book] = await books(api, intent_id)
    assert book["outcome"] == "authorized"
    if done["status"] == "succeeded":
        assert list(book["kinds"]) == ["capture"]
        assert done["amount_received"] == book["captured_later"] == charge["amount_captured"]
        assert charge["amount_refunded"] == book["amount"] - book["captured_later"]
    else:
        assert list(book["kinds"]) == ["void"]
        assert (done["amount_received"], charge["amount_captured"]) == (0, 0)
        assert charge["amount_refunded"] == book["voided"] == book["amount"]
    return done


def accepted(replies: list[Reply]) -> list[Reply]:
    for reply in replies:
        # Refused where the edge could tell, or the same key still in flight: never a 5xx.
        assert reply.status in (202, 400, 409), (reply.status, reply.body)
        if reply.status == 400:
            assert reply.error["code"] == "payment_intent_unexpected_state", reply.body
    return [r for r in replies if r.status == 202]


async def test_captures_and_cancels_at_once(api: Client) -> None:
    for round_ in range(3):
        intent = await authorized(api, 2000 + round_)
        path = f"/v1/payment_intents/{intent['id']}"
        posts = []
        for i in range(12):
            if i % 2:
                posts.append(api.post(f"{path}/cancel", {"cancellation_reason": "duplicate"}))
            else:
                posts.append(api.post(f"{path}/capture", {"amount_to_capture": str(1000 + i)}))
        replies = await asyncio.gather(*posts)
        assert accepted(replies)
        done = await outcome(api, intent["id"])
        rejected = await api.db.fetchval(
            "SELECT count(*) FROM inbox WHERE object_id = $1 AND outcome = 'rejected'",
            intent["id"])
        applied = await api.db.fetch(
            "SELECT command FROM inbox WHERE object_id = $1 AND outcome = 'applied' AND "
            "command <> 'payment_intent.create'", intent["id"])
        # Exactly one of the accepted commands took effect; the others were refused.
        assert len(applied) == 1 and rejected == len(accepted(replies)) - 1
        wanted = "capture" if done["status"] == "succeeded" else "cancel"
        assert applied[0]["command"] == f"payment_intent.{wanted}"


async def test_the_same_capture_many_times(api: Client) -> None:
    intent = await authorized(api, 3000)
    key = str(uuid.uuid4())
    replies = await asyncio.gather(*(
        api.post(f"/v1/payment_intents/{intent['id']}/capture", {"amount_to_capture": "2500"},
                 key=key) for _ in range(10)))
    assert all(r.status in (202, 409) for r in replies), [r.status for r in replies]
    first = expect(next(r for r in replies if r.status == 202))
    # Every retry converges on the one capture.
    again = expect(await api.post(f"/v1/payment_intents/{intent['id']}/capture",
                                  {"amount_to_capture": "2500"}, key=key))
    assert again["id"] == first["id"]
    done = await outcome(api, intent["id"])
    assert (done["status"], done["amount_received"]) == ("succeeded", 2500)


async def test_the_same_cancel_many_times_beside_captures(api: Client) -> None:
    intent = await authorized(api, 1500)
    path = f"/v1/payment_intents/{intent['id']}"
    key = str(uuid.uuid4())
    replies = await asyncio.gather(
        *(api.post(f"{path}/cancel", key=key) for _ in range(6)),
        *(api.post(f"{path}/capture") for _ in range(6)))
    accepted(replies)
    await outcome(api, intent["id"])
    assert await api.db.fetchval(
        "SELECT count(*) FROM inbox WHERE object_id = $1 AND command = "
        "'payment_intent.cancel'", intent["id"]) <= 1
