"""`Prefer: wait=N` on the POSTs that move money: the outcome in the same answer, as Stripe's
API gives it (200, or 402 card_error for a decline, which Stripe's library raises as
CardError), the 202 when it does not come in time, and the same answer again for a retry with
the same Idempotency-Key."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import stripe

from edge.settle import preferred_wait
from tests.conftest import Client, Stack, make_settings, stack

DECLINED = "pm_card_visa_chargeDeclinedInsufficientFunds"
WAIT = {"Prefer": "wait=20"}


async def test_a_confirmed_create_answers_its_outcome(api: Client) -> None:
    reply = await api.post("/v1/payment_intents", {
        "amount": "2000", "currency": "usd", "payment_method": "pm_card_visa",
        "confirm": "true"}, headers=WAIT)
    assert reply.status == 200, reply.body
    assert reply.body["status"] == "succeeded"
    assert reply.body["amount_received"] == 2000
    assert reply.headers["Preference-Applied"] == "wait=20"


async def test_a_decline_is_a_402_card_error_kept_for_the_key(api: Client) -> None:
    key = str(uuid.uuid4())
    body = {"amount": "2000", "currency": "usd", "payment_method": DECLINED, "confirm": "true"}
    reply = await api.post("/v1/payment_intents", body, key=key, headers=WAIT)
    assert reply.status == 402, reply.body
    error = reply.error
    assert error["type"] == "card_error"
    assert error["code"] == "card_declined"
    assert error["decline_code"] == "insufficient_funds"
    assert error["charge"].startswith("ch_")
    assert error["payment_intent"]["status"] == "requires_payment_method"
    again = await api.post("/v1/payment_intents", body, key=key)
    assert again.status == 402
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.body == reply.body


async def test_confirm_and_capture_wait_for_their_outcome(api: Client) -> None:
    created = await api.post("/v1/payment_intents", {
        "amount": "3000", "currency": "usd", "payment_method": "pm_card_visa",
        "capture_method": "manual"})
    assert created.status == 202
    intent_id = created.body["id"]
    confirmed = await api.post(f"/v1/payment_intents/{intent_id}/confirm", headers=WAIT)
    assert confirmed.status == 200, confirmed.body
    assert confirmed.body["status"] == "requires_capture"
    assert confirmed.body["amount_capturable"] == 3000
    captured = await api.post(f"/v1/payment_intents/{intent_id}/capture",
                              {"amount_to_capture": "1000"}, headers=WAIT)
    assert captured.status == 200, captured.body
    assert captured.body["status"] == "succeeded"
    assert captured.body["amount_received"] == 1000


async def test_an_outcome_that_does_not_come_in_time_is_the_202(migrated: None) -> None:
    # A PSP slower than the wait.
    async with stack(make_settings(psp_latency_ms=(3000, 3000))) as s:
        api = await s.client()
        reply = await api.post("/v1/payment_intents", {
            "amount": "2000", "currency": "usd", "payment_method": "pm_card_visa",
            "confirm": "true"}, headers={"Prefer": "wait=1"})
        assert reply.status == 202
        assert reply.body["status"] == "processing"
        assert "Preference-Applied" not in reply.headers


async def test_without_the_preference_nothing_waits(api: Client) -> None:
    reply = await api.post("/v1/payment_intents", {
        "amount": "2000", "currency": "usd", "payment_method": DECLINED, "confirm": "true"})
    assert reply.status == 202
    assert reply.body["status"] == "processing"


@pytest.mark.parametrize(("headers", "wanted"), [
    ({}, 0), ({"Prefer": "wait=5"}, 5), ({"Prefer": "respond-async, wait=7"}, 7),
    ({"Prefer": "wait=999"}, 30), ({"Prefer": "wait=soon"}, 0), ({"Prefer": "WAIT=3"}, 3),
    ({"Prefer": "return=minimal"}, 0), ({"Prefer": "wait=-1"}, 0),
])
def test_the_preference_is_read_as_rfc_7240_says(headers: dict[str, str], wanted: int) -> None:
    from aiohttp.test_utils import make_mocked_request

    assert preferred_wait(make_mocked_request("POST", "/", headers=headers)) == wanted


async def test_stripes_library_raises_card_error_with_the_decline(shared: Stack) -> None:
    key = (await shared.client()).secret_key
    base = shared.base_url.rstrip("/")

    def pay() -> tuple[Any, stripe.CardError]:
        client = stripe.StripeClient(key, base_addresses={"api": base}).v1
        options: Any = {"headers": WAIT}
        paid = client.payment_intents.create(params={
            "amount": 1500, "currency": "usd", "payment_method": "pm_card_visa",
            "confirm": True}, options=options)
        with pytest.raises(stripe.CardError) as declined:
            client.payment_intents.create(params={
                "amount": 1500, "currency": "usd", "payment_method": DECLINED,
                "confirm": True}, options=options)
        return paid, declined.value

    paid, declined = await asyncio.to_thread(pay)
    assert paid.status == "succeeded"
    assert declined.http_status == 402
    assert declined.code == "card_declined"
    assert declined.error is not None
    assert declined.error.decline_code == "insufficient_funds"
    assert declined.error.payment_intent is not None
    assert declined.error.payment_intent.status == "requires_payment_method"
