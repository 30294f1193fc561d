"""Webhook deliveries through faults: the dispatcher killed with attempts under way and retries
pending, and RabbitMQ stopped and started again while deliveries wait. After each, every event
reaches every endpoint; a duplicate is only ever the same event with the same `webhook-id`."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import Client, Proc, Stack, form, free_port, make_settings, stack, start_proc
from tests.private import (
    PrivateServices,
    private_services_fixture,  # noqa: F401
)
from tests.support import EXPECTED_EVENTS, VISA, wait_settled
from tests.webhook_support import (
    Hit,
    Receiver,
    add_endpoint,
    all_finished,
    deliveries,
    events_of,
    eventually,
    verify,
)

PAYMENTS = 12


def fails_first(times: int) -> Callable[[Hit], Awaitable[web.StreamResponse]]:
    """Each event's first `times` attempts get a 500, the next ones a 200."""
    seen: dict[str, int] = {}

    async def handler(hit: Hit) -> web.StreamResponse:
        event_id = hit.event["id"]
        seen[event_id] = seen.get(event_id, 0) + 1
        return web.Response(status=500 if seen[event_id] <= times else 200)
    return handler


async def slow(hit: Hit) -> web.StreamResponse:
    await asyncio.sleep(0.5)
    return web.Response(status=200)


async def pay_retrying(api: Client) -> str:
    """A confirmed payment, its POST retried with its key through 503s and lost
    connections, as stripe-python retries."""
    key = str(uuid.uuid4())
    for _ in range(120):
        try:
            reply = await api.post("/v1/payment_intents", form({
                "amount": 2000, "currency": "usd", "payment_method": VISA, "confirm": True}),
                key=key)
        except (aiohttp.ClientError, TimeoutError):
            await asyncio.sleep(0.5)
            continue
        if reply.status == 202:
            return str(reply.body["id"])
        assert reply.status in (409, 503), (reply.status, reply.body)
        await asyncio.sleep(0.5)
    raise AssertionError("the payment was never accepted")


async def finished(s: Stack, endpoint: str, count: int) -> None:
    try:
        await eventually(lambda: all_finished(s.db, endpoint, count),
                         f"every delivery to {endpoint} finished", within_s=60)
    except AssertionError as exc:
        states = await s.db.fetch("SELECT state, count(*) FROM webhook_deliveries "
                                  "WHERE endpoint_id = $1 GROUP BY 1", endpoint)
        unpublished = await s.db.fetchval(
            "SELECT count(*) FROM events e JOIN webhook_endpoints w ON w.account_id = "
            "e.account_id JOIN events_outbox o ON o.seq = e.seq WHERE w.id = $1", endpoint)
        raise AssertionError(f"{exc}: {count} events, deliveries "
                             f"{[tuple(r) for r in states]}, {unpublished} unpublished") from None


async def check_everything_delivered(s: Stack, receiver: Receiver, account_id: str,
                                     paths: dict[str, tuple[str, str]]) -> None:
    """Every event of the account at every endpoint, each verified; duplicates only of the
    same event, with the same webhook-id and body."""
    await wait_settled(s.db, account_id, 2 * PAYMENTS)
    events = {r["id"] for r in await events_of(s.db, account_id)}
    assert len(events) == PAYMENTS * 2 * len(EXPECTED_EVENTS[VISA])
    for path, (endpoint, secret) in paths.items():
        await finished(s, endpoint, len(events))
        assert {r["state"] for r in await deliveries(s.db, endpoint)} == {"succeeded"}
        bodies: dict[str, dict[str, Any]] = {}
        for hit in receiver.at(path):
            verify(hit, secret)
            event = hit.event
            event.pop("pending_webhooks")
            assert bodies.setdefault(event["id"], event) == event
        assert set(bodies) == events


async def test_a_killed_dispatcher_leaves_nothing_undelivered(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    receiver = await Receiver().start()
    receiver.handlers["slow"] = slow
    receiver.handlers["flaky"] = fails_first(1)
    # A 2 s attempt timeout and 1 s database calls: a dead dispatcher's leases lapse in 5 s.
    settings = make_settings(webhook_retry_schedule="0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
                             webhook_timeout_s=2.0, db_timeout_s=1.0,
                             dispatcher_metrics_port=free_port())
    try:
        async with stack(settings) as s:
            api = await s.client()
            paths = {path: await add_endpoint(s.db, settings, api.account_id, receiver.url(path))
                     for path in ("slow", "flaky")}
            first = await start_proc("dispatcher", settings, procs, tmp_path)
            await asyncio.gather(*(pay_retrying(api) for _ in range(PAYMENTS)))
            slow_id, flaky_id = paths["slow"][0], paths["flaky"][0]

            async def mid_way() -> bool:
                flaky = await deliveries(s.db, flaky_id)
                done = [d for d in await deliveries(s.db, slow_id) if d["state"] == "succeeded"]
                return bool(done) and any(d["state"] == "pending" and d["attempts"] >= 1
                                          for d in flaky)

            async def under_way() -> bool:
                return len(receiver.at("slow")) > sum(1 for h in receiver.finished
                                                      if h.path == "slow")

            await eventually(mid_way, "deliveries made, retries pending")
            await eventually(under_way, "an attempt under way")
            # No await between seeing an attempt under way and the kill: it cannot end first.
            first.kill()
            await asyncio.gather(*(pay_retrying(api) for _ in range(PAYMENTS)))
            await start_proc("dispatcher", settings, procs, tmp_path)
            await check_everything_delivered(s, receiver, api.account_id, paths)
            # The attempts cut off are on record as such.
            interrupted = await s.db.fetchval(
                "SELECT count(*) FROM webhook_attempts a JOIN webhook_deliveries d "
                "ON d.id = a.delivery_id WHERE d.endpoint_id = $1 AND a.error LIKE "
                "'interrupted:%'", slow_id)
            assert interrupted >= 1
    finally:
        await receiver.stop()


async def test_rabbitmq_restarted_while_deliveries_wait_loses_nothing(
    private_services: PrivateServices,
) -> None:
    await private_services.heal()
    receiver = await Receiver().start()
    receiver.handlers["flaky"] = fails_first(2)
    settings = private_services.settings(
        webhook_retry_schedule="1,1,1,1,1,1,1,1,1,1", db_timeout_s=1.0, publish_timeout_s=2.0,
        request_timeout_s=4.0, idempotency_lock_ms=5000)
    try:
        async with stack(settings, dispatcher=True) as s:
            api = await s.client()
            paths = {path: await add_endpoint(s.db, settings, api.account_id, receiver.url(path))
                     for path in ("ok", "flaky")}
            await asyncio.gather(*(pay_retrying(api) for _ in range(PAYMENTS)))
            flaky = paths["flaky"][0]

            async def waiting() -> set[str]:
                return {d["id"] for d in await deliveries(s.db, flaky)
                        if d["state"] == "pending" and d["attempts"] >= 1}

            await eventually(lambda: _nonempty(waiting()), "retries pending")
            # The broker stops (its node lives on; a node killed with -9 can come back with
            # a quorum queue that never elects its leader, RabbitMQ 3.10's issue 10070).
            await private_services.rabbitmq_stop_app()
            pending = await waiting()

            async def retried_meanwhile() -> bool:
                return any(d["id"] in pending and d["state"] == "succeeded"
                           for d in await deliveries(s.db, flaky))

            # Retries live in Postgres: they go on while the broker is away.
            await eventually(retried_meanwhile, "a retry delivered while RabbitMQ is down")
            await private_services.rabbitmq_start_app()
            await asyncio.gather(*(pay_retrying(api) for _ in range(PAYMENTS)))
            await check_everything_delivered(s, receiver, api.account_id, paths)
            assert s.dispatcher is not None
            ready = f"http://127.0.0.1:{s.dispatcher.port}/ready"

            async def green() -> bool:
                async with s.session.get(ready) as resp:
                    return resp.status == 200

            await eventually(green, "the dispatcher ready again")
    finally:
        await receiver.stop()
        await private_services.heal()


async def _nonempty(ids: Awaitable[set[str]]) -> bool:
    return bool(await ids)
