"""Long-polls: `GET /v1/payment_intents/{id}?wait=N` (and `/charge`) answer as soon as the
intent changes, or at N with its state then; an intent with nothing under way answers at once.
They are woken by the status fan-out (events → RabbitMQ → processor → Redis pub/sub), and
every waiter is removed however its request ends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from contracts import status
from contracts.errors import RateLimited
from edge.app import create_app
from edge.waiters import StatusWaiters, status_client_name
from ops.loops import Loop
from tests.conftest import Client, Stack, make_settings, stack
from tests.support import DECLINED, VISA

# Slow enough that a test reads the intent while the PSP call is under way.
SLOW_PSP = make_settings(psp_latency_ms=(1500, 1500)).psp_latency_ms
WAIT_S = 20


def slow_settings(**overrides: Any) -> Any:
    return make_settings(psp_latency_ms=SLOW_PSP, **overrides)


async def waiting_now(api: Client) -> float:
    """The edge's gauge of waiting requests (the only edge of the test's own stack)."""
    reply = await api.get("/metrics", auth=None)
    line = next(line for line in reply.body.splitlines()
                if line.startswith("payonce_edge_longpoll_waiters "))
    return float(line.split()[1])


async def waiting_is(api: Client, count: int) -> bool:
    return await waiting_now(api) == count


async def until(check: Any, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def confirmed_at_psp(api: Client, amount: int = 1500, card: str = VISA) -> str:
    """An intent whose confirm is applied and whose PSP call is under way."""
    created = await api.create(amount=amount, currency="usd", payment_method=card)
    intent_id = str(created.body["id"])
    await api.wait_for(intent_id, ["requires_confirmation"])
    assert (await api.post(f"/v1/payment_intents/{intent_id}/confirm")).status == 202

    async def processing() -> bool:
        status = await api.db.fetchval("SELECT status FROM payment_intents WHERE id = $1",
                                       intent_id)
        return bool(status == "processing")

    await until(processing)
    return intent_id


async def timed_get(api: Client, path: str) -> tuple[Any, float]:
    started = time.monotonic()
    reply = await api.get(path)
    return reply, time.monotonic() - started


async def test_answers_soon_after_the_payment_settles(migrated: None) -> None:
    async with stack(slow_settings()) as s:
        api = await s.client()
        intent_id = await confirmed_at_psp(api)
        reply, took = await timed_get(api, f"/v1/payment_intents/{intent_id}?wait={WAIT_S}")
        assert reply.status == 200
        assert reply.body["status"] == "succeeded"
        assert reply.body["latest_charge"]
        assert took < WAIT_S / 2


async def test_a_decline_ends_the_wait_too(migrated: None) -> None:
    async with stack(slow_settings()) as s:
        api = await s.client()
        intent_id = await confirmed_at_psp(api, card=DECLINED)
        reply, took = await timed_get(api, f"/v1/payment_intents/{intent_id}?wait={WAIT_S}")
        assert reply.status == 200
        assert reply.body["status"] == "requires_payment_method"
        assert reply.body["last_payment_error"]["decline_code"] == "generic_decline"
        assert took < WAIT_S / 2


async def test_answers_at_n_with_the_current_state(migrated: None) -> None:
    async with stack() as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd", payment_method=VISA)
        intent_id = created.body["id"]
        await api.wait_for(intent_id, ["requires_confirmation"])
        # Nothing applies the confirm: it stays under way for the whole wait.
        await s.stop_processor()
        assert (await api.post(f"/v1/payment_intents/{intent_id}/confirm")).status == 202
        reply, took = await timed_get(api, f"/v1/payment_intents/{intent_id}?wait=2")
        assert reply.status == 200
        assert reply.body["status"] == "processing"
        assert took >= 1.9
        charge, took = await timed_get(api, f"/v1/payment_intents/{intent_id}/charge?wait=1")
        assert charge.status == 425 and charge.headers["Retry-After"] == "1"
        assert took >= 0.9
        await s.start_processor()
        await api.wait_for(intent_id, ["succeeded"])


async def test_an_intent_at_rest_answers_at_once(api: Client) -> None:
    created = await api.create(amount=1000, currency="usd", payment_method=VISA, confirm=True)
    intent_id = created.body["id"]
    done = await api.wait_for(intent_id, ["succeeded"])
    reply, took = await timed_get(api, f"/v1/payment_intents/{intent_id}?wait=30")
    assert reply.status == 200 and reply.body == done
    assert took < 15
    charge, took = await timed_get(api, f"/v1/payment_intents/{intent_id}/charge?wait=30")
    assert charge.status == 200 and charge.body["status"] == "succeeded"
    assert took < 15
    fresh = await api.create(amount=1000, currency="usd")
    await api.wait_for(fresh.body["id"], ["requires_payment_method"])
    reply, took = await timed_get(api, f"/v1/payment_intents/{fresh.body['id']}?wait=30")
    assert reply.status == 200 and reply.body["status"] == "requires_payment_method"
    assert took < 15
    missing, took = await timed_get(api, f"/v1/payment_intents/pi_{'0' * 24}?wait=30")
    assert missing.status == 404 and missing.error["code"] == "resource_missing"
    assert took < 15


async def test_the_charges_425_is_waited(migrated: None) -> None:
    async with stack(slow_settings()) as s:
        api = await s.client()
        intent_id = await confirmed_at_psp(api)
        assert (await api.get(f"/v1/payment_intents/{intent_id}/charge")).status == 425
        reply, took = await timed_get(api, f"/v1/payment_intents/{intent_id}/charge"
                                           f"?wait={WAIT_S}")
        assert reply.status == 200
        assert reply.body["object"] == "charge" and reply.body["status"] == "succeeded"
        assert reply.body["payment_intent"] == intent_id
        assert took < WAIT_S / 2


async def test_a_create_not_applied_yet_is_waited(migrated: None) -> None:
    async with stack(processor=False) as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd")
        intent_id = created.body["id"]
        assert (await api.get(f"/v1/payment_intents/{intent_id}")).status == 425
        waiting = asyncio.create_task(
            timed_get(api, f"/v1/payment_intents/{intent_id}?wait={WAIT_S}"))
        await until(lambda: waiting_is(api, 1))
        await s.start_processor()
        reply, took = await waiting
        assert reply.status == 200 and reply.body["status"] == "requires_payment_method"
        assert took < WAIT_S / 2
        # Still not applied at N: the 425, after the wait.
        await s.stop_processor()
        other = await api.create(amount=1000, currency="usd")
        late, took = await timed_get(api, f"/v1/payment_intents/{other.body['id']}?wait=1")
        assert late.status == 425 and late.error["code"] == "resource_not_ready"
        assert took >= 0.9


async def test_many_waiters_at_once(migrated: None) -> None:
    async with stack(slow_settings()) as s:
        api = await s.client()
        intents = [await confirmed_at_psp(api, amount=1000 + i) for i in range(3)]
        paths = [f"/v1/payment_intents/{intent_id}{suffix}?wait={WAIT_S}"
                 for intent_id in intents for suffix in ("", "/charge") for _ in range(20)]
        replies = await asyncio.gather(*(timed_get(api, path) for path in paths))
        for (reply, took), path in zip(replies, paths, strict=True):
            assert reply.status == 200, (path, reply.body)
            assert reply.body["status"] == "succeeded"
            assert took < WAIT_S / 2
        assert await waiting_now(api) == 0


async def test_a_client_that_leaves_frees_its_waiter(migrated: None) -> None:
    async with stack() as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd", payment_method=VISA)
        intent_id = created.body["id"]
        await api.wait_for(intent_id, ["requires_confirmation"])
        await s.stop_processor()
        assert (await api.post(f"/v1/payment_intents/{intent_id}/confirm")).status == 202
        async with aiohttp.ClientSession() as own:
            request = asyncio.create_task(own.get(
                f"{api.base_url}/v1/payment_intents/{intent_id}?wait=30",
                headers={"Authorization": f"Bearer {api.secret_key}"}))
            await until(lambda: waiting_is(api, 1))
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
        # Gone well before its 30 s: the waiter noticed its closed connection.
        await until(lambda: waiting_is(api, 0), within_s=10)
        await s.start_processor()
        await api.wait_for(intent_id, ["succeeded"])


async def test_a_stopping_edge_answers_its_waiters(migrated: None) -> None:
    async with stack() as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd", payment_method=VISA)
        intent_id = created.body["id"]
        await api.wait_for(intent_id, ["requires_confirmation"])
        await s.stop_processor()
        assert (await api.post(f"/v1/payment_intents/{intent_id}/confirm")).status == 202
        edge = TestServer(create_app(s.settings), host="127.0.0.1")
        await edge.start_server()

        async def long_poll() -> tuple[int, Any]:
            async with s.session.get(
                    edge.make_url(f"/v1/payment_intents/{intent_id}?wait=30"),
                    headers={"Authorization": f"Bearer {api.secret_key}"}) as resp:
                return resp.status, await resp.json()

        waiting = asyncio.create_task(long_poll())
        await until(lambda: waiting_is(api, 1))
        started = time.monotonic()
        await edge.close()
        status, body = await waiting
        assert status == 200 and body["status"] == "processing"
        assert time.monotonic() - started < 15
        await s.start_processor()
        await api.wait_for(intent_id, ["succeeded"])


async def test_waiters_are_bounded(migrated: None) -> None:
    async with stack(make_settings(longpoll_max_waiters=1), processor=False) as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd")
        intent_id = created.body["id"]
        first = asyncio.create_task(api.get(f"/v1/payment_intents/{intent_id}?wait=3"))
        await until(lambda: waiting_is(api, 1))
        refused = await api.get(f"/v1/payment_intents/{intent_id}?wait=3")
        assert refused.status == 429
        assert refused.error["code"] == "rate_limit"
        assert refused.headers["Retry-After"] == "1"
        # Without `wait` nothing waits, so nothing is refused.
        assert (await api.get(f"/v1/payment_intents/{intent_id}")).status == 425
        assert (await first).status == 425
        assert await waiting_now(api) == 0


async def test_a_lost_subscription_connection_comes_back(migrated: None) -> None:
    """Redis drops the edge's pub/sub connection mid-wait: the edge connects again,
    subscribes again, and the waiter still hears the change."""
    async with stack(slow_settings()) as s:
        api = await s.client()
        intent_id = await confirmed_at_psp(api)
        waiting = asyncio.create_task(
            timed_get(api, f"/v1/payment_intents/{intent_id}?wait={WAIT_S}"))
        await until(lambda: waiting_is(api, 1))
        listing = (await s.redis.execute_command("CLIENT", "LIST", "TYPE", "pubsub")).decode()
        ours = [line.split()[0].removeprefix("id=") for line in listing.splitlines()
                if f"name={status_client_name(s.settings.amqp_prefix)}" in line]
        assert len(ours) == 1, listing
        await s.redis.execute_command("CLIENT", "KILL", "ID", ours[0])
        reply, took = await waiting
        assert reply.status == 200 and reply.body["status"] == "succeeded"
        assert took < WAIT_S / 2


async def test_a_ready_waiter_hears_what_is_published_after(migrated: None) -> None:
    """The hub against Redis alone: waiters joining and leaving one channel as fast as they
    can, each ready one hears a notification published right after it was ready (the reply
    it waited for is its own SUBSCRIBE's, not an earlier one's)."""
    settings = make_settings()
    hub = StatusWaiters(settings.redis_url, settings.amqp_prefix, max_waiters=10,
                        timeout_s=2.0)
    loop = Loop("test_status_subscription", hub.run, stale_after_s=15.0)
    loop.start()
    publisher = aioredis.from_url(settings.redis_url)
    channel = status.channel(settings.amqp_prefix, "acct_test", "pi_test")
    try:
        for _ in range(30):
            async with hub.watch("acct_test", "pi_test"):
                pass  # gone at once: its SUBSCRIBE and UNSUBSCRIBE are both queued
            async with hub.watch("acct_test", "pi_test") as watch:
                await watch.ready()
                await publisher.publish(channel, b"{}")
                assert await watch.wait(5.0)
        assert hub.waiting == 0
        other = [hub.watch("acct_test", f"pi_{i}") for i in range(10)]
        for cm in other:
            await cm.__aenter__()
        with pytest.raises(RateLimited):
            async with hub.watch("acct_test", "pi_11"):
                pass
        for cm in other:
            await cm.__aexit__(None, None, None)
        assert hub.waiting == 0
    finally:
        await loop.stop()
        await publisher.aclose()


@pytest.mark.parametrize("value", ["31", "-1", "abc", "1.5", "99999999999999999999"])
@pytest.mark.parametrize("suffix", ["", "/charge"])
async def test_bad_wait_values(api: Client, shared: Stack, value: str, suffix: str) -> None:
    created = await api.create(amount=1000, currency="usd")
    intent_id = created.body["id"]
    reply = await api.get(f"/v1/payment_intents/{intent_id}{suffix}?wait={value}")
    assert reply.status == 400, reply.body
    assert reply.error["type"] == "invalid_request_error"
    assert reply.error["param"] == "wait"
    assert reply.error["code"] == "parameter_invalid_integer"
    twice = await api.get(f"/v1/payment_intents/{intent_id}{suffix}?wait=1&wait=2")
    assert twice.status == 400 and twice.error["param"] == "wait"
    unknown = await api.get(f"/v1/payment_intents/{intent_id}{suffix}?wiat=1")
    assert unknown.status == 400 and unknown.error["code"] == "parameter_unknown"
