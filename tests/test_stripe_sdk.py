"""Stripe's official Python library against payonce: the wire format, the 202 with a full
object, errors turned into the library's exception classes, and its idempotency keys."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import stripe

from tests.conftest import Client, Stack


def sdk(base: str, key: str) -> Any:
    # Retries as the library does by default; none are needed while nothing fails.
    return stripe.StripeClient(key, base_addresses={"api": base}, max_network_retries=2).v1


def wait_status(client: Any, intent_id: str, statuses: set[str]) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            intent = client.payment_intents.retrieve(intent_id)
        except stripe.APIError as exc:  # 425 while the create is not applied yet
            assert exc.http_status == 425
        else:
            if intent.status in statuses:
                return intent
        time.sleep(0.05)
    raise AssertionError(f"{intent_id} never reached {statuses}")


def flow(base: str, key: str) -> None:
    client = sdk(base, key)
    created = client.payment_intents.create(params={
        "amount": 2000, "currency": "usd", "metadata": {"order": "7"},
        "payment_method": "pm_card_visa", "confirm": True})
    assert isinstance(created, stripe.PaymentIntent)
    assert created.status == "processing"
    assert created.metadata["order"] == "7"
    done = wait_status(client, created.id, {"succeeded"})
    assert done.amount_received == 2000
    assert done.latest_charge.startswith("ch_")

    key = str(uuid.uuid4())
    first = client.payment_intents.create(params={"amount": 500, "currency": "eur"},
                                          options={"idempotency_key": key})
    again = client.payment_intents.create(params={"amount": 500, "currency": "eur"},
                                          options={"idempotency_key": key})
    assert first.id == again.id
    with pytest.raises(stripe.IdempotencyError):
        client.payment_intents.create(params={"amount": 501, "currency": "eur"},
                                      options={"idempotency_key": key})
    with pytest.raises(stripe.InvalidRequestError) as invalid:
        client.payment_intents.create(params={"amount": -1, "currency": "usd"})
    assert invalid.value.code == "amount_too_small"
    assert invalid.value.param == "amount"

    confirmed = client.payment_intents.confirm(
        first.id, params={"payment_method": "pm_card_visa_chargeDeclinedInsufficientFunds"})
    assert confirmed.status == "processing"
    declined = wait_status(client, first.id, {"requires_payment_method"})
    assert declined.last_payment_error.code == "card_declined"
    assert declined.last_payment_error.decline_code == "insufficient_funds"

    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.payment_intents.retrieve("pi_" + "a" * 24)
    assert missing.value.http_status == 404
    assert missing.value.code == "resource_missing"
    with pytest.raises(stripe.AuthenticationError):
        sdk(base, "sk_test_nope").payment_intents.retrieve(first.id)


async def test_official_library(shared: Stack, api: Client) -> None:
    await asyncio.to_thread(flow, shared.base_url.rstrip("/"), api.secret_key)
