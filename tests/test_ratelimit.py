"""Per-account rate limits: over the limit a request is a 429 `rate_limit` (Stripe's
RateLimitError in its library) that does nothing, other accounts are not slowed, and a POST
refused this way leaves its Idempotency-Key free."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import stripe

from edge.keys import ADMISSION, PUBLISHER, WAITERS
from tests.conftest import Stack, make_settings, stack

RATE = 5.0
BURST = 3


@pytest.fixture(scope="module")
async def limited(migrated: None) -> AsyncIterator[Stack]:
    async with stack(make_settings(rate_limit_per_s=RATE, rate_limit_burst=BURST)) as s:
        yield s


async def test_a_burst_beyond_the_limit_is_refused_with_stripes_error(limited: Stack) -> None:
    api = await limited.client()
    started = time.monotonic()
    replies = await asyncio.gather(*(api.get("/v1/payment_intents") for _ in range(20)))
    elapsed = time.monotonic() - started
    ok = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status == 429]
    assert len(ok) + len(refused) == 20
    # The burst, and what the steady rate let through while the requests were under way.
    assert BURST + 1 <= len(ok) <= BURST + 2 + elapsed * RATE, [r.status for r in replies]
    assert refused
    error = refused[0].error
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "rate_limit"
    assert error["message"].startswith("Too many requests hit the API too quickly.")
    assert int(refused[0].headers["Retry-After"]) >= 1

    # Another account has a limit of its own.
    other = await limited.client()
    assert (await other.get("/v1/payment_intents")).status == 200


async def test_a_refused_post_does_nothing_and_its_key_runs_later(limited: Stack) -> None:
    api = await limited.client()
    await asyncio.gather(*(api.get("/v1/payment_intents") for _ in range(BURST + 3)))
    key = str(uuid.uuid4())
    params = {"amount": "1000", "currency": "usd"}
    refused = await api.post("/v1/payment_intents", params, key=key)
    assert refused.status == 429
    assert await api.db.fetchval("SELECT count(*) FROM inbox WHERE account_id = $1",
                                 api.account_id) == 0
    for _ in range(50):
        await asyncio.sleep(1 / RATE)
        accepted = await api.post("/v1/payment_intents", params, key=key)
        if accepted.status != 429:
            break
    assert accepted.status == 202, accepted.body
    assert "Idempotent-Replayed" not in accepted.headers


async def test_stripes_library_raises_rate_limit_error(limited: Stack) -> None:
    key = (await limited.client()).secret_key
    base = limited.base_url.rstrip("/")

    def burst() -> stripe.RateLimitError:
        client = stripe.StripeClient(key, base_addresses={"api": base},
                                     max_network_retries=0).v1
        with pytest.raises(stripe.RateLimitError) as raised:
            for _ in range(BURST + 10):
                client.payment_intents.list()
        return raised.value

    error = await asyncio.to_thread(burst)
    assert error.http_status == 429
    assert error.json_body is not None and error.json_body["error"]["code"] == "rate_limit"


async def test_posts_past_the_edges_bound_are_refused_at_once_and_change_nothing(
    migrated: None,
) -> None:
    """Load shedding (edge/admission.py): with one POST running, a second gets a 429 before
    its key is claimed; once the first has its 202 the same key runs as new, and a POST
    waiting for its outcome after its 202 (`Prefer: wait`) no longer holds its place."""
    async with stack(make_settings(edge_max_posts=1), processor=False) as s:
        assert s.app is not None
        api = await s.client()
        publisher = s.app[PUBLISHER]
        publish = publisher.publish
        publishing, go_on = asyncio.Event(), asyncio.Event()

        async def held(command: Any, **kw: Any) -> None:
            publishing.set()
            await go_on.wait()
            await publish(command, **kw)

        publisher.publish = held  # type: ignore[method-assign]
        params = {"amount": "1000", "currency": "usd"}
        first = asyncio.create_task(api.post("/v1/payment_intents", params))
        await publishing.wait()
        key = str(uuid.uuid4())
        refused = await api.post("/v1/payment_intents", params, key=key)
        assert refused.status == 429, refused
        assert refused.error["type"] == "invalid_request_error"
        assert refused.error["code"] == "rate_limit"
        assert refused.headers["Retry-After"] == "1"
        assert refused.headers["Stripe-Should-Retry"] == "true"
        assert not await s.redis.exists(f"idem:{api.account_id}:{key}")
        go_on.set()
        assert (await first).status == 202
        publisher.publish = publish  # type: ignore[method-assign]

        accepted = await api.post("/v1/payment_intents", params, key=key)
        assert accepted.status == 202, accepted
        assert "Idempotent-Replayed" not in accepted.headers

        # No processor runs: this confirm waits its whole second after its 202.
        waiting = asyncio.create_task(api.post(
            f"/v1/payment_intents/{accepted.body['id']}/confirm",
            {"payment_method": "pm_card_visa"}, headers={"Prefer": "wait=1"}))
        for _ in range(100):
            if s.app[WAITERS].waiting:
                break
            await asyncio.sleep(0.01)
        assert s.app[WAITERS].waiting == 1
        assert s.app[ADMISSION].running == 0
        assert (await api.create(amount=500, currency="usd")).status == 202
        assert not waiting.done()
        assert (await waiting).status == 202
        assert s.app[ADMISSION].running == 0
