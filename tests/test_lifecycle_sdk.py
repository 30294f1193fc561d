"""The lifecycle through Stripe's official Python library: update, manual capture (partial),
cancel, and the state errors as the library's exceptions."""

from __future__ import annotations

import asyncio

import pytest
import stripe

from tests.conftest import Client, Stack
from tests.test_stripe_sdk import sdk, wait_status


def lifecycle(base: str, key: str) -> None:
    client = sdk(base, key)
    created = client.payment_intents.create(params={
        "amount": 3000, "currency": "usd", "capture_method": "manual",
        "metadata": {"order": "9", "gift": "yes"}})
    updated = client.payment_intents.update(created.id, params={
        "amount": 2600, "payment_method": "pm_card_visa", "metadata": {"gift": ""}})
    assert isinstance(updated, stripe.PaymentIntent)
    assert (updated.status, updated.amount) == ("requires_confirmation", 2600)
    assert updated.metadata.to_dict() == {"order": "9"}
    client.payment_intents.confirm(created.id)
    held = wait_status(client, created.id, {"requires_capture"})
    assert held.amount_capturable == 2600

    capturing = client.payment_intents.capture(created.id, params={"amount_to_capture": 2000})
    assert capturing.status == "processing"
    done = wait_status(client, created.id, {"succeeded"})
    assert (done.amount_received, done.amount_capturable) == (2000, 0)
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.payment_intents.cancel(created.id)
    assert refused.value.code == "payment_intent_unexpected_state"
    assert "status of succeeded" in str(refused.value.user_message)

    other = client.payment_intents.create(params={"amount": 800, "currency": "usd"})
    canceled = client.payment_intents.cancel(other.id,
                                             params={"cancellation_reason": "abandoned"})
    assert (canceled.status, canceled.cancellation_reason) == ("canceled", "abandoned")
    with pytest.raises(stripe.InvalidRequestError) as invalid:
        client.payment_intents.cancel(other.id, params={"cancellation_reason": "whim"})
    assert invalid.value.param == "cancellation_reason"


async def test_lifecycle_with_the_official_library(shared: Stack, api: Client) -> None:
    await asyncio.to_thread(lifecycle, shared.base_url.rstrip("/"), api.secret_key)
