"""Webhook deliveries end to end: payments through the edge and the processor, their events
through the outbox relay and the dispatcher, to receivers on 127.0.0.1 that answer as each
test says. Endpoints are written straight into Postgres, as the edge writes them."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
import standardwebhooks
import stripe
from aiohttp import web
from prometheus_client import REGISTRY

from contracts.topology import Topology
from processor.signing import signature_headers
from processor.webhook_intake import Acks
from tests.conftest import Client, Stack, make_settings, settings_env, stack
from tests.support import DECLINED, EXPECTED_EVENTS, VISA, create
from tests.webhook_support import (
    Hit,
    Receiver,
    add_endpoint,
    all_finished,
    as_api_shows,
    attempts,
    deliveries,
    events_of,
    eventually,
    verify,
)

SCHEDULE = "0.2,0.4,1.5"


@pytest.fixture(scope="module")
async def hooks(migrated: None) -> AsyncIterator[tuple[Stack, Receiver]]:
    """A stack with a dispatcher retrying on a short schedule, and a receiver."""
    receiver = await Receiver().start()
    settings = make_settings(webhook_retry_schedule=SCHEDULE, webhook_timeout_s=2.0)
    try:
        async with stack(settings, dispatcher=True) as s:
            yield s, receiver
    finally:
        await receiver.stop()


async def pay(api: Client, card: str = VISA) -> str:
    intent_id = await create(api, 2000, card, confirm_separately=False)
    await api.wait_for(intent_id)
    return intent_id


def answer(status: int, **headers: str) -> Any:
    async def handler(hit: Hit) -> web.StreamResponse:
        return web.Response(status=status, headers=headers)
    return handler


async def test_a_payments_events_arrive_as_the_events_api_shows_them_signed_both_ways(
    hooks: tuple[Stack, Receiver],
) -> None:
    s, receiver = hooks
    api = await s.client()
    every, secret = await add_endpoint(s.db, s.settings, api.account_id, receiver.url("every"))
    charges, charges_secret = await add_endpoint(
        s.db, s.settings, api.account_id, receiver.url("charges"), ("charge.succeeded",))
    await pay(api, VISA)
    await pay(api, DECLINED)
    expected = len(EXPECTED_EVENTS[VISA]) + len(EXPECTED_EVENTS[DECLINED])
    await eventually(lambda: all_finished(s.db, every, expected), "every event delivered")
    await eventually(lambda: all_finished(s.db, charges, 1), "the charge delivered")

    rows = await events_of(s.db, api.account_id)
    assert len(rows) == expected
    by_id = {r["id"]: r for r in rows}
    hits = receiver.at("every")
    assert {h.event["id"] for h in hits} == set(by_id)
    for hit in hits:
        verify(hit, secret)
        event = hit.event
        assert event["pending_webhooks"] >= 1
        event.pop("pending_webhooks")
        assert event == as_api_shows(by_id[event["id"]])
    # One object's events arrive in the order they were written.
    first_seen = list(dict.fromkeys(h.event["id"] for h in hits))
    for object_id in {r["object_id"] for r in rows}:
        written = [r["id"] for r in rows if r["object_id"] == object_id]
        assert [i for i in first_seen if i in written] == written
    [charge] = receiver.at("charges")
    verify(charge, charges_secret)
    assert charge.event["type"] == "charge.succeeded"

    for delivery in await deliveries(s.db, every):
        assert delivery["state"] == "succeeded"
        [attempt] = await attempts(s.db, delivery["id"])
        assert (attempt["attempt"], attempt["status_code"], attempt["error"],
                attempt["next_attempt_at"]) == (1, 200, None, None)

    # A tampered body, or a signature made five minutes ago, fails both verifiers.
    hit = hits[0]
    headers = {k.lower(): v for k, v in hit.headers.items()}
    tampered = hit.body.replace(b'"livemode":false', b'"livemode":true')
    assert tampered != hit.body
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(tampered.decode(), headers["stripe-signature"], secret)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(tampered, headers)
    old = {k.lower(): v for k, v in signature_headers(
        secret, hit.event["id"], hit.body, timestamp=int(time.time()) - 400).items()}
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(hit.body.decode(), old["stripe-signature"], secret)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(hit.body, old)
    fresh = {k.lower(): v for k, v in signature_headers(secret, hit.event["id"],
                                                          hit.body).items()}
    standardwebhooks.Webhook(secret).verify(hit.body, fresh)


async def test_a_failed_attempt_is_retried_with_the_same_webhook_id(
    hooks: tuple[Stack, Receiver],
) -> None:
    s, receiver = hooks
    api = await s.client()

    async def flaky(hit: Hit) -> web.StreamResponse:
        return web.Response(status=500 if hit.number <= 2 else 200)

    receiver.handlers["flaky"] = flaky
    endpoint, secret = await add_endpoint(s.db, s.settings, api.account_id,
                                          receiver.url("flaky"), ("payment_intent.succeeded",))
    await pay(api)
    await eventually(lambda: all_finished(s.db, endpoint, 1), "delivered on a retry")
    [delivery] = await deliveries(s.db, endpoint)
    assert (delivery["state"], delivery["attempts"]) == ("succeeded", 3)
    hits = receiver.at("flaky")
    assert len(hits) == 3
    assert {h.headers["webhook-id"] for h in hits} == {delivery["event_id"]}
    for hit in hits:
        verify(hit, secret)
    tries = await attempts(s.db, delivery["id"])
    assert [(a["attempt"], a["status_code"]) for a in tries] == [(1, 500), (2, 500), (3, 200)]
    assert [a["next_attempt_at"] is None for a in tries] == [False, False, True]
    assert all(a["error"] == "HTTP 500" for a in tries[:2])
    assert tries[0]["next_attempt_at"] <= tries[1]["created"]


async def test_a_receiver_that_always_fails_ends_failed_after_the_configured_attempts(
    hooks: tuple[Stack, Receiver],
) -> None:
    s, receiver = hooks
    api = await s.client()
    receiver.handlers["down"] = answer(503)
    endpoint, _ = await add_endpoint(s.db, s.settings, api.account_id, receiver.url("down"),
                                     ("payment_intent.created",))
    await pay(api)
    await eventually(lambda: all_finished(s.db, endpoint, 1), "given up", within_s=30)
    [delivery] = await deliveries(s.db, endpoint)
    assert (delivery["state"], delivery["attempts"]) == ("failed", 4)
    assert len(receiver.at("down")) == 4
    tries = await attempts(s.db, delivery["id"])
    assert [a["status_code"] for a in tries] == [503] * 4
    assert tries[-1]["next_attempt_at"] is None
    # Failing for seconds is far from the days after which an endpoint is disabled.
    endpoint_row = await s.db.fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1", endpoint)
    assert endpoint_row["status"] == "enabled"
    assert endpoint_row["failing_since"] is not None


async def test_410_disables_the_endpoint_with_an_event_that_other_endpoints_receive(
    hooks: tuple[Stack, Receiver],
) -> None:
    s, receiver = hooks
    api = await s.client()
    receiver.handlers["gone"] = answer(410)
    gone, _ = await add_endpoint(s.db, s.settings, api.account_id, receiver.url("gone"))
    _, secret = await add_endpoint(s.db, s.settings, api.account_id, receiver.url("watcher"))
    await pay(api)

    async def disabled_event_received() -> bool:
        return any(h.event["type"] == "webhook_endpoint.disabled"
                   for h in receiver.at("watcher"))

    await eventually(disabled_event_received, "webhook_endpoint.disabled delivered")
    row = await s.db.fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1", gone)
    assert row["status"] == "disabled"
    assert "410" in row["disabled_reason"]
    [event] = [r for r in await events_of(s.db, api.account_id)
               if r["type"] == "webhook_endpoint.disabled"]
    assert event["exchange"] == Topology(s.settings.amqp_prefix, 1).events
    assert event["object_id"] == gone
    assert event["data"]["status"] == "disabled"
    assert event["previous_attributes"] == {"status": "enabled"}
    [hit] = [h for h in receiver.at("watcher") if h.event["type"] == "webhook_endpoint.disabled"]
    verify(hit, secret)
    assert hit.event["data"]["object"]["id"] == gone
    # Nothing more is sent to it: what was not sent yet ends failed, with no attempt.
    await eventually(lambda: all_finished(s.db, gone), "the disabled endpoint's deliveries end")
    sent = 0
    for delivery in await deliveries(s.db, gone):
        assert delivery["state"] == "failed"
        sent += len(await attempts(s.db, delivery["id"]))
    assert sent == len(receiver.at("gone")) >= 1
    assert {a["status_code"] for d in await deliveries(s.db, gone)
            for a in await attempts(s.db, d["id"])} == {410}


async def test_retry_after_is_honoured_up_to_the_schedules_last_step(
    hooks: tuple[Stack, Receiver],
) -> None:
    s, receiver = hooks
    api = await s.client()

    def later(seconds: str) -> Any:
        async def handler(hit: Hit) -> web.StreamResponse:
            if hit.number == 1:
                return web.Response(status=429, headers={"Retry-After": seconds})
            return web.Response(status=200)
        return handler

    receiver.handlers["later"] = later("1")
    receiver.handlers["much-later"] = later("3600")
    soon, _ = await add_endpoint(s.db, s.settings, api.account_id, receiver.url("later"),
                                 ("payment_intent.created",))
    capped, _ = await add_endpoint(s.db, s.settings, api.account_id,
                                   receiver.url("much-later"), ("payment_intent.created",))
    await pay(api)
    await eventually(lambda: all_finished(s.db, soon, 1), "delivered after Retry-After")
    await eventually(lambda: all_finished(s.db, capped, 1), "delivered despite Retry-After")
    for endpoint, least, most in ((soon, 1.0, 60.0), (capped, 0.0, 60.0)):
        [delivery] = await deliveries(s.db, endpoint)
        assert delivery["state"] == "succeeded"
        first, second = await attempts(s.db, delivery["id"])
        assert first["status_code"] == 429 and second["status_code"] == 200
        wait = first["next_attempt_at"] - first["created"]
        # The schedule alone says 0.2 s; Retry-After asks for 1 s; 3600 s is capped at 1.5 s.
        assert timedelta(seconds=least) <= wait < timedelta(seconds=most)
        assert second["created"] >= first["next_attempt_at"]


async def test_redirects_are_not_followed(hooks: tuple[Stack, Receiver]) -> None:
    s, receiver = hooks
    api = await s.client()
    receiver.handlers["moved"] = answer(302, Location=receiver.url("moved-here"))
    endpoint, _ = await add_endpoint(s.db, s.settings, api.account_id, receiver.url("moved"),
                                     ("payment_intent.created",))
    await pay(api)
    await eventually(lambda: all_finished(s.db, endpoint, 1), "given up")
    [delivery] = await deliveries(s.db, endpoint)
    assert delivery["state"] == "failed"
    tries = await attempts(s.db, delivery["id"])
    assert {(a["status_code"], a["error"]) for a in tries} == {
        (302, "redirects are not followed")}
    assert receiver.at("moved-here") == []
    assert len(receiver.at("moved")) == len(tries) == 4


async def test_a_retry_requested_during_an_attempt_is_not_lost(
    hooks: tuple[Stack, Receiver],
) -> None:
    s, receiver = hooks
    api = await s.client()
    endpoint = ""
    # What `POST /v1/events/{id}/retry` does to a delivery, at any moment.
    retry = ("UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = now(), "
             "updated_at = now() WHERE endpoint_id = $1")

    async def again(hit: Hit) -> web.StreamResponse:
        if hit.number == 1:
            await s.db.execute(retry, endpoint)
        return web.Response(status=200)

    receiver.handlers["again"] = again
    endpoint, _ = await add_endpoint(s.db, s.settings, api.account_id, receiver.url("again"),
                                     ("payment_intent.created",))
    await pay(api)

    async def sent_twice() -> bool:
        return len(receiver.at("again")) == 2 and await all_finished(s.db, endpoint, 1)

    await eventually(sent_twice, "sent again after the retry request")
    [delivery] = await deliveries(s.db, endpoint)
    assert (delivery["state"], delivery["attempts"]) == ("succeeded", 2)
    # A retry of a finished delivery is one more attempt, numbered after the others.
    await s.db.execute(retry, endpoint)

    async def sent_thrice() -> bool:
        return len(receiver.at("again")) == 3 and await all_finished(s.db, endpoint, 1)

    await eventually(sent_thrice, "sent again after a retry of the finished delivery")
    tries = await attempts(s.db, delivery["id"])
    assert [(a["attempt"], a["status_code"]) for a in tries] == [(1, 200), (2, 200), (3, 200)]
    assert len({h.headers["webhook-id"] for h in receiver.at("again")}) == 1


async def test_a_deleted_endpoints_deliveries_end_failed_without_being_sent(
    hooks: tuple[Stack, Receiver],
) -> None:
    s, receiver = hooks
    api = await s.client()
    held = asyncio.Event()
    release = asyncio.Event()

    async def hold(hit: Hit) -> web.StreamResponse:
        held.set()
        await release.wait()
        return web.Response(status=200)

    receiver.handlers["deleted"] = hold
    endpoint, _ = await add_endpoint(
        s.db, s.settings, api.account_id, receiver.url("deleted"),
        ("payment_intent.created", "payment_intent.processing", "payment_intent.succeeded"))
    await pay(api)
    # payment_intent.created is being sent; the intent's next events wait for it, in order.
    await asyncio.wait_for(held.wait(), 10)
    await s.db.execute("UPDATE webhook_endpoints SET deleted_at = now() WHERE id = $1", endpoint)
    release.set()
    await eventually(lambda: all_finished(s.db, endpoint), "the deleted endpoint's deliveries")
    [hit] = receiver.at("deleted")
    assert hit.event["type"] == "payment_intent.created"
    rows = await deliveries(s.db, endpoint)
    assert rows[0]["state"] == "succeeded"
    assert len(rows) >= 2
    for row in rows[1:]:
        assert row["state"] == "failed"
        assert await attempts(s.db, row["id"]) == []


async def test_messages_that_are_not_events_are_dropped_and_counted(
    hooks: tuple[Stack, Receiver],
) -> None:
    s, receiver = hooks
    api = await s.client()
    endpoint, _ = await add_endpoint(s.db, s.settings, api.account_id, receiver.url("after"),
                                     ("payment_intent.created",))
    labels = {"outcome": "not_an_event"}
    before = REGISTRY.get_sample_value("payonce_dispatcher_events_total", labels) or 0.0
    topology = Topology(s.settings.amqp_prefix, s.settings.partitions)
    connection = await aio_pika.connect(s.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for body in (b"not json", b'{"object": "payment_intent"}', b"[1, 2]"):
            await channel.default_exchange.publish(aio_pika.Message(body),
                                                   routing_key=topology.webhooks)

        async def counted() -> bool:
            now = REGISTRY.get_sample_value("payonce_dispatcher_events_total", labels) or 0.0
            return now - before >= 3

        await eventually(counted, "the three messages counted")
        await pay(api)
        await eventually(lambda: all_finished(s.db, endpoint, 1), "the next event delivered")

        async def queue_empty() -> bool:
            queue = await channel.declare_queue(topology.webhooks, passive=True)
            return queue.declaration_result.message_count == 0

        await eventually(queue_empty, "nothing left in the webhook queue")


async def test_ready_and_metrics(hooks: tuple[Stack, Receiver]) -> None:
    s, _ = hooks
    assert s.dispatcher is not None
    base = f"http://127.0.0.1:{s.dispatcher.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/ready") as resp:
            body = orjson.loads(await resp.read())
            assert resp.status == 200, body
        assert {"postgres", "rabbitmq", "webhook_intake", "webhook_claimer",
                "webhook_settler"} <= set(body["checks"])
        async with session.get(f"{base}/metrics") as resp:
            text = await resp.text()
    for name in ("payonce_dispatcher_due_deliveries", "payonce_dispatcher_due_oldest_seconds",
                 "payonce_dispatcher_attempt_seconds_bucket",
                 "payonce_dispatcher_delivery_lag_seconds_bucket",
                 "payonce_dispatcher_in_flight", 'payonce_dispatcher_deliveries_total{outcome="'):
        assert name in text, name
    assert "payonce_dispatcher_due_deliveries NaN" not in text


async def test_a_hanging_endpoint_does_not_hold_back_another(migrated: None) -> None:
    receiver = await Receiver().start()
    release = asyncio.Event()
    hanging = {"now": 0, "most": 0}

    async def hang(hit: Hit) -> web.StreamResponse:
        hanging["now"] += 1
        hanging["most"] = max(hanging["most"], hanging["now"])
        try:
            await release.wait()
        finally:
            hanging["now"] -= 1
        return web.Response(status=200)

    receiver.handlers["hang"] = hang
    # The timeout outlasts the test: the hanging endpoint's attempts stay under way.
    settings = make_settings(webhook_timeout_s=60.0, webhook_endpoint_concurrency=2,
                             webhook_concurrency=16)
    try:
        async with stack(settings, dispatcher=True) as s:
            api = await s.client()
            await add_endpoint(s.db, s.settings, api.account_id, receiver.url("hang"))
            fast, _ = await add_endpoint(s.db, s.settings, api.account_id,
                                         receiver.url("fast"))
            payments = 8
            await asyncio.gather(*(pay(api) for _ in range(payments)))
            events = payments * len(EXPECTED_EVENTS[VISA])
            await eventually(lambda: all_finished(s.db, fast, events),
                             "every event delivered to the other endpoint")
            assert len(receiver.event_ids("fast")) == events
            # Meanwhile the hanging endpoint holds its own two slots, and no attempt of it
            # has ended.
            assert hanging["most"] == 2
            assert not [h for h in receiver.finished if h.path == "hang"]
            release.set()
    finally:
        release.set()
        await receiver.stop()


async def test_an_endpoints_bound_holds_while_chains_wait_for_their_settles(
    migrated: None,
) -> None:
    """A chain gives its endpoint's slot to another while its outcome is settled, and waits
    its turn for one after: with a bound of one, the receiver never sees two requests at
    once, and every event of many payments arrives, each object's in order."""
    receiver = await Receiver().start()
    now = {"in": 0, "most": 0}

    async def one_at_a_time(hit: Hit) -> web.StreamResponse:
        now["in"] += 1
        now["most"] = max(now["most"], now["in"])
        try:
            await asyncio.sleep(0.005)
        finally:
            now["in"] -= 1
        return web.Response(status=200)

    receiver.handlers["bound"] = one_at_a_time
    try:
        async with stack(make_settings(webhook_endpoint_concurrency=1),
                         dispatcher=True) as s:
            api = await s.client()
            endpoint, _ = await add_endpoint(s.db, s.settings, api.account_id,
                                             receiver.url("bound"))
            payments = 12
            intents = await asyncio.gather(*(pay(api) for _ in range(payments)))
            expected = payments * len(EXPECTED_EVENTS[VISA])
            await eventually(lambda: all_finished(s.db, endpoint, expected),
                             "every event delivered")
            assert now["most"] == 1
            assert {r["state"] for r in await deliveries(s.db, endpoint)} == {"succeeded"}
            hits = [h.event for h in receiver.at("bound")]
            for intent_id in intents:
                mine = [e["type"] for e in hits if e["data"]["object"]["id"] == intent_id]
                assert mine == [t for t in EXPECTED_EVENTS[VISA]
                                if t.startswith("payment_intent.")]
    finally:
        await receiver.stop()


async def test_new_deliveries_are_sent_by_the_intake_without_a_claim(migrated: None) -> None:
    """The intake records each new delivery under its own lease and sends it: with the
    claimer stopped, every event still arrives, in order, each in one attempt."""
    receiver = await Receiver().start()
    try:
        async with stack(make_settings(), dispatcher=True) as s:
            assert s.dispatcher is not None
            await s.dispatcher.loop("webhook_claimer").stop()
            api = await s.client()
            endpoint, _ = await add_endpoint(s.db, s.settings, api.account_id,
                                             receiver.url("intake"))
            intent_id = await pay(api)
            expected = len(EXPECTED_EVENTS[VISA])
            await eventually(lambda: all_finished(s.db, endpoint, expected),
                             "every event delivered without a claim")
            rows = await deliveries(s.db, endpoint)
            assert {(r["state"], r["attempts"]) for r in rows} == {("succeeded", 1)}
            hits = [h.event for h in receiver.at("intake")]
            assert len(hits) == expected
            intent_events = [e["type"] for e in hits if e["data"]["object"]["id"] == intent_id]
            assert intent_events == [t for t in EXPECTED_EVENTS[VISA]
                                     if t.startswith("payment_intent.")]
    finally:
        await receiver.stop()


async def test_a_graceful_stop_gives_back_the_deliveries_it_held_and_did_not_send(
    migrated: None,
) -> None:
    """An object's events wait in line behind one being sent. A dispatcher stopped meanwhile
    frees those it never sent, so the next one sends them once, in order, with no attempt
    lost; the one cut off is sent again after its lease."""
    receiver = await Receiver().start()
    release = asyncio.Event()

    async def hold_created(hit: Hit) -> web.StreamResponse:
        if hit.event["type"] == "payment_intent.created":
            await release.wait()
        return web.Response(status=200)

    receiver.handlers["held"] = hold_created
    # The cut-off attempt's lease runs out after 3 s, then twice the 1-s db timeout, then 1 s.
    settings = make_settings(webhook_timeout_s=3.0, shutdown_grace_s=0.5, db_timeout_s=1.0)
    try:
        async with stack(settings, dispatcher=True) as s:
            api = await s.client()
            endpoint, _ = await add_endpoint(s.db, s.settings, api.account_id,
                                             receiver.url("held"),
                                             ("payment_intent.created",
                                              "payment_intent.processing",
                                              "payment_intent.succeeded"))
            await pay(api)

            async def queued() -> bool:
                rows = await deliveries(s.db, endpoint)
                return len(rows) == 3 and all(r["locked_until"] is not None for r in rows)

            await eventually(queued, "the intent's three events held by the dispatcher")
            assert [h.event["type"] for h in receiver.at("held")] == ["payment_intent.created"]
            assert s.dispatcher is not None
            deliverer = s.dispatcher.deliverer
            await s.stop_dispatcher()
            # The chain cut off mid-send left nothing waiting for its settle.
            assert not deliverer._waiters
            rows = {r["type"]: r for r in await deliveries(s.db, endpoint)}
            for later in ("payment_intent.processing", "payment_intent.succeeded"):
                assert (rows[later]["state"], rows[later]["attempts"],
                        rows[later]["locked_until"]) == ("pending", 0, None)
            assert rows["payment_intent.created"]["locked_until"] is not None
            release.set()
            await s.start_dispatcher()
            await eventually(lambda: all_finished(s.db, endpoint, 3), "all three delivered")
            arrived = [h.event["type"] for h in receiver.at("held")]
            assert arrived == ["payment_intent.created", "payment_intent.created",
                               "payment_intent.processing", "payment_intent.succeeded"]
            for row in await deliveries(s.db, endpoint):
                tries = [(a["attempt"], a["status_code"]) for a in
                         await attempts(s.db, row["id"])]
                if row["type"] == "payment_intent.created":
                    assert tries == [(1, None), (2, 200)]  # cut off, then sent again
                else:
                    assert tries == [(1, 200)]
    finally:
        release.set()
        await receiver.stop()


async def given_up(s: Stack, endpoint: str) -> None:
    await eventually(lambda: all_finished(s.db, endpoint, 1), "given up")


async def test_private_addresses_are_refused_at_delivery(migrated: None) -> None:
    receiver = await Receiver().start()
    settings = make_settings(webhook_allow_private=False, webhook_retry_schedule="0.1,0.1")
    try:
        async with stack(settings, dispatcher=True) as s:
            api = await s.client()
            # The edge refuses such URLs; written straight into the table, as a name that
            # resolved elsewhere when it was checked would be.
            literal, _ = await add_endpoint(s.db, settings, api.account_id,
                                            receiver.url("literal"), ("payment_intent.created",))
            named, _ = await add_endpoint(s.db, settings, api.account_id,
                                          receiver.url("named", host="localhost"),
                                          ("payment_intent.created",))
            await pay(api)
            for endpoint in (literal, named):
                await given_up(s, endpoint)
                [delivery] = await deliveries(s.db, endpoint)
                assert (delivery["state"], delivery["attempts"]) == ("failed", 3)
                for attempt in await attempts(s.db, delivery["id"]):
                    assert attempt["status_code"] is None
                    assert "forbidden address" in attempt["error"], attempt["error"]
            assert receiver.hits == []
    finally:
        await receiver.stop()


async def test_an_endpoint_failing_for_too_long_is_disabled(migrated: None) -> None:
    receiver = await Receiver().start()
    receiver.handlers["failing"] = answer(500)
    settings = make_settings(webhook_disable_after_s=0.5,
                             webhook_retry_schedule="0.3,0.3,0.3,0.3,0.3,0.3")
    try:
        async with stack(settings, dispatcher=True) as s:
            api = await s.client()
            failing, _ = await add_endpoint(s.db, settings, api.account_id,
                                            receiver.url("failing"), ("payment_intent.created",))
            await add_endpoint(s.db, settings, api.account_id, receiver.url("watcher"),
                               ("webhook_endpoint.disabled",))
            await pay(api)
            await eventually(lambda: all_finished(s.db, failing, 1), "given up")

            async def told() -> bool:
                return bool(receiver.at("watcher"))

            await eventually(told, "webhook_endpoint.disabled delivered")
            row = await s.db.fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1", failing)
            assert row["status"] == "disabled"
            assert row["disabled_reason"].startswith("Every delivery attempt failed")
            [hit] = receiver.at("watcher")
            assert hit.event["data"]["object"]["id"] == failing
            [delivery] = await deliveries(s.db, failing)
            tries = await attempts(s.db, delivery["id"])
            assert delivery["state"] == "failed"
            # Disabled once its failures spanned 0.5 s, before the schedule ran out.
            assert 2 <= len(tries) < 7
    finally:
        await receiver.stop()


def spawn(args: list[str], env: dict[str, str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    """`payonce ARGS` with its output in files."""
    with out.open("wb") as stdout, err.open("wb") as stderr:
        return subprocess.Popen([sys.executable, "-m", "ops.cli", *args], env=env,
                                stdout=stdout, stderr=stderr)


async def test_payonce_listen_forwards_deliveries_and_deletes_its_endpoint_on_exit(
    hooks: tuple[Stack, Receiver], tmp_path: Path,
) -> None:
    s, receiver = hooks
    api = await s.client()
    out = tmp_path / "listen.out"
    listen = spawn(["listen", "--forward-to", receiver.url("local"), "--api-key", api.secret_key,
                    "--api-base", s.base_url,
                    "--events", "payment_intent.created,payment_intent.succeeded"],
                   settings_env(s.settings), out, tmp_path / "listen.err")
    try:
        async def ready() -> bool:
            assert listen.poll() is None, (tmp_path / "listen.err").read_text()
            return "Ready!" in out.read_text()

        await eventually(ready, "listen ready")
        secret = re.search(r"(whsec_\S+)", out.read_text())
        assert secret is not None
        [endpoint] = await s.db.fetch("SELECT * FROM webhook_endpoints WHERE account_id = $1",
                                      api.account_id)
        assert endpoint["url"].startswith("http://127.0.0.1:")
        assert sorted(endpoint["enabled_events"]) == ["payment_intent.created",
                                                      "payment_intent.succeeded"]
        intent_id = await pay(api)

        async def forwarded() -> bool:
            return len(receiver.at("local")) == 2 and out.read_text().count("<-- [200]") == 2

        await eventually(forwarded, "both events forwarded")
        for hit in receiver.at("local"):
            verify(hit, secret.group(1))
            assert hit.event["data"]["object"]["id"] == intent_id
        assert "payment_intent.succeeded [evt_" in out.read_text()
        listen.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(listen.wait, 15) == 0
        assert "deleted" in out.read_text()
        deleted = await s.db.fetchval("SELECT deleted_at FROM webhook_endpoints WHERE id = $1",
                                      endpoint["id"])
        assert deleted is not None
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait(10)


class _Delivered:
    def __init__(self, tag: int, acks: list[tuple[int, bool]]) -> None:
        self.delivery_tag = tag
        self._acks = acks

    async def ack(self, multiple: bool = False) -> None:
        self._acks.append((self.delivery_tag, multiple))


async def test_intake_acks_a_batch_in_one_frame_only_when_nothing_before_it_is_unacked() -> None:
    acks: list[tuple[int, bool]] = []
    intake_acks = Acks()

    async def ack(*tags: int) -> list[tuple[int, bool]]:
        acks.clear()
        await intake_acks.ack([_Delivered(t, acks) for t in tags])  # type: ignore[misc]
        return list(acks)

    assert await ack(1, 2, 3) == [(3, True)]
    # Tag 5 is still in the inbox: a multiple ack of 6 would ack it unrecorded.
    assert await ack(4, 6) == [(4, False), (6, False)]
    assert await ack(5) == [(5, True)]
    assert await ack(8, 7) == [(8, True)]
    assert await ack(9) == [(9, True)]
