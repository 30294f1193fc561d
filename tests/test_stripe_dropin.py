"""A merchant's code written for Stripe, run against payonce by changing only the base address
(`stripe.api_base`, the library's module-level API): a manual payment authorized, captured in
part and refunded in part, a declined one, a canceled one, lists and events paged with
`auto_paging_iter`, the library's error classes, and its own retries converging on one
object."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import stripe

from tests.conftest import Client, Stack

# As a merchant who wants Stripe's synchronous answers would send it.
WAIT: Any = {"Prefer": "wait=20"}


@pytest.fixture
def stripe_at(shared: Stack, api: Client) -> Iterator[str]:
    saved = (stripe.api_base, stripe.api_key, stripe.max_network_retries)
    stripe.api_base = shared.base_url.rstrip("/")
    stripe.api_key = api.secret_key
    stripe.max_network_retries = 2
    try:
        yield api.account_id
    finally:
        stripe.api_base, stripe.api_key, stripe.max_network_retries = saved


def until(fetch: Any, done: Any) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            found = fetch()
        except stripe.APIError as exc:  # 425 while a command is not applied yet
            assert exc.http_status == 425
        else:
            if done(found):
                return found
        time.sleep(0.05)
    raise AssertionError("never reached")


def merchant() -> None:
    order = stripe.PaymentIntent.create(
        amount=5000, currency="usd", capture_method="manual", payment_method="pm_card_visa",
        metadata={"order": "A-1"}, confirm=True, headers=WAIT)
    assert isinstance(order, stripe.PaymentIntent)
    assert (order.status, order.amount_capturable) == ("requires_capture", 5000)
    captured = stripe.PaymentIntent.capture(order.id, amount_to_capture=4000, headers=WAIT)
    assert (captured.status, captured.amount_received) == ("succeeded", 4000)

    refund = stripe.Refund.create(payment_intent=order.id, amount=1500)
    assert isinstance(refund, stripe.Refund)
    assert refund.status == "pending"
    refund = until(lambda: stripe.Refund.retrieve(refund.id), lambda r: r.status != "pending")
    assert refund.status == "succeeded"
    charge = stripe.Charge.retrieve(captured.latest_charge)
    # The 1000 not captured was released; 1500 of the captured 4000 refunded.
    assert (charge.amount_captured, charge.amount_refunded, charge.refunded) == (4000, 2500,
                                                                                 False)
    with pytest.raises(stripe.InvalidRequestError) as too_much:
        stripe.Refund.create(payment_intent=order.id, amount=3000)
    assert too_much.value.param == "amount"

    with pytest.raises(stripe.CardError) as declined:
        stripe.PaymentIntent.create(
            amount=1200, currency="usd", confirm=True, headers=WAIT,
            payment_method="pm_card_visa_chargeDeclinedInsufficientFunds")
    assert declined.value.code == "card_declined"
    assert declined.value.error is not None
    assert declined.value.error.decline_code == "insufficient_funds"

    abandoned = stripe.PaymentIntent.create(amount=900, currency="usd")
    canceled = stripe.PaymentIntent.cancel(abandoned.id, cancellation_reason="abandoned")
    assert canceled.status == "canceled"

    listed = until(lambda: [pi.id for pi in stripe.PaymentIntent.list(limit=2)
                            .auto_paging_iter()], lambda ids: len(ids) == 3)
    assert set(listed) == {order.id, declined.value.error.payment_intent.id, abandoned.id}
    # The cancel's event is written once the processor applies it, after its 202.
    expected = {"payment_intent.amount_capturable_updated", "charge.captured", "refund.created",
                "payment_intent.canceled"}
    types = until(lambda: {e.type for e in stripe.Event.list(limit=3).auto_paging_iter()},
                  lambda found: expected <= found)
    assert expected <= types

    with pytest.raises(stripe.InvalidRequestError) as invalid:
        stripe.PaymentIntent.create(amount=-5, currency="usd")
    assert invalid.value.param == "amount"
    key = str(uuid.uuid4())
    stripe.PaymentIntent.create(amount=700, currency="usd", idempotency_key=key)
    with pytest.raises(stripe.IdempotencyError):
        stripe.PaymentIntent.create(amount=701, currency="usd", idempotency_key=key)
    with pytest.raises(stripe.AuthenticationError):
        stripe.PaymentIntent.list(api_key="sk_test_" + "x" * 24)


async def test_a_merchants_stripe_code_runs_unchanged(stripe_at: str) -> None:
    await asyncio.to_thread(merchant)


async def test_the_librarys_retries_of_one_key_converge(stripe_at: str) -> None:
    """Many copies of one request at once: the ones answered 409 (the key in flight) are
    retried by the library with the same key, and every copy ends with the same intent."""
    key = str(uuid.uuid4())
    found: list[str] = []
    lock = threading.Lock()

    def send() -> None:
        intent = stripe.PaymentIntent.create(amount=2500, currency="usd",
                                             idempotency_key=key)
        with lock:
            found.append(intent.id)

    await asyncio.gather(*(asyncio.to_thread(send) for _ in range(8)))
    assert len(found) == 8 and len(set(found)) == 1
