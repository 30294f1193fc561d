"""The payment flow end to end: create, confirm, the PSP, the outcome, and the events."""

from __future__ import annotations

import asyncio

import aio_pika
import orjson
import pytest

from contracts import ids
from contracts.topology import Topology
from tests.conftest import Client, Stack, make_settings, stack

DECLINES = [
    ("pm_card_visa_chargeDeclined", "card_declined", "generic_decline"),
    ("pm_card_visa_chargeDeclinedInsufficientFunds", "card_declined", "insufficient_funds"),
    ("pm_card_visa_chargeDeclinedLostCard", "card_declined", "lost_card"),
    ("pm_card_visa_chargeDeclinedStolenCard", "card_declined", "stolen_card"),
    ("pm_card_chargeDeclinedExpiredCard", "expired_card", "expired_card"),
    ("pm_card_chargeDeclinedIncorrectCvc", "incorrect_cvc", "incorrect_cvc"),
    ("pm_card_chargeDeclinedProcessingError", "processing_error", "processing_error"),
    ("pm_card_visa_chargeDeclinedVelocityLimitExceeded", "card_declined", "card_velocity_exceeded"),
]


async def test_create_then_confirm_succeeds(api: Client) -> None:
    created = await api.create(amount=2000, currency="USD", metadata={"order": "42"},
                               description="two tickets", customer="cus_123")
    assert created.status == 202, created.body
    intent = created.body
    assert intent["object"] == "payment_intent"
    assert intent["id"].startswith("pi_")
    assert intent["status"] == "requires_payment_method"
    assert intent["currency"] == "usd"
    assert intent["amount"] == 2000
    assert intent["metadata"] == {"order": "42"}
    assert intent["client_secret"].startswith(f"{intent['id']}_secret_")
    assert intent["livemode"] is False and isinstance(intent["created"], int)
    assert created.headers["Request-Id"].startswith("req_")

    applied = await api.wait_for(intent["id"], ["requires_payment_method"])
    assert {k: applied[k] for k in ("amount", "currency", "metadata", "description", "customer",
                                    "client_secret", "created")} == \
        {k: intent[k] for k in ("amount", "currency", "metadata", "description", "customer",
                                "client_secret", "created")}

    confirmed = await api.post(f"/v1/payment_intents/{intent['id']}/confirm",
                               {"payment_method": "pm_card_visa"})
    assert confirmed.status == 202, confirmed.body
    assert confirmed.body["status"] == "processing"
    assert confirmed.body["payment_method"] == "pm_card_visa"

    done = await api.wait_for(intent["id"], ["succeeded"])
    assert done["amount_received"] == 2000
    assert done["latest_charge"].startswith("ch_")
    assert done["last_payment_error"] is None

    charge = await api.get(f"/v1/payment_intents/{intent['id']}/charge")
    assert charge.status == 200
    assert charge.body["id"] == done["latest_charge"]
    assert charge.body["status"] == "succeeded"
    assert charge.body["amount"] == charge.body["amount_captured"] == 2000
    assert charge.body["authorization_code"]
    assert charge.body["payment_intent"] == intent["id"]
    # Copied from the intent, as Stripe does: in every read of the charge and in its event.
    copied = {"customer": "cus_123", "description": "two tickets"}
    assert {k: charge.body[k] for k in copied} == copied
    read = await api.get(f"/v1/charges/{done['latest_charge']}")
    assert {k: read.body[k] for k in copied} == copied
    event = await api.db.fetchval("SELECT data FROM events WHERE object_id = $1 AND type = "
                                  "'charge.succeeded'", done["latest_charge"])
    assert {k: event[k] for k in copied} == copied


async def test_create_with_confirm_true(api: Client) -> None:
    created = await api.create(amount=1500, currency="eur", payment_method="pm_card_mastercard",
                               confirm=True)
    assert created.status == 202
    assert created.body["status"] == "processing"
    done = await api.wait_for(created.body["id"])
    assert done["status"] == "succeeded"


async def test_json_body_is_the_same_request(api: Client) -> None:
    created = await api.post("/v1/payment_intents", json={
        "amount": 700, "currency": "gbp", "metadata": {"order": 7}, "payment_method":
        "pm_card_amex", "confirm": True})
    assert created.status == 202, created.body
    assert created.body["metadata"] == {"order": "7"}
    assert (await api.wait_for(created.body["id"]))["status"] == "succeeded"


@pytest.mark.parametrize(("payment_method", "code", "decline_code"), DECLINES)
async def test_declines(api: Client, payment_method: str, code: str, decline_code: str) -> None:
    created = await api.create(amount=999, currency="usd", payment_method=payment_method,
                               confirm=True)
    assert created.status == 202
    done = await api.wait_for(created.body["id"])
    assert done["status"] == "requires_payment_method"
    error = done["last_payment_error"]
    assert error["type"] == "card_error"
    assert error["code"] == code
    assert error["decline_code"] == decline_code
    assert error["message"]
    charge = await api.get(f"/v1/payment_intents/{done['id']}/charge")
    assert charge.status == 200
    assert charge.body["status"] == "failed"
    assert charge.body["failure_code"] == code
    assert charge.body["outcome"]["reason"] == decline_code
    assert charge.body["amount_captured"] == 0 and charge.body["paid"] is False
    assert done["amount_received"] == 0


async def test_declined_intent_can_be_confirmed_again(api: Client) -> None:
    created = await api.create(amount=500, currency="usd",
                               payment_method="pm_card_visa_chargeDeclined", confirm=True)
    first = await api.wait_for(created.body["id"])
    assert first["status"] == "requires_payment_method"
    retry = await api.post(f"/v1/payment_intents/{first['id']}/confirm",
                           {"payment_method": "pm_card_visa"})
    assert retry.status == 202
    assert retry.body["last_payment_error"] is None
    done = await api.wait_for(first["id"], ["succeeded"])
    assert done["latest_charge"] != first["latest_charge"]
    charges = await api.db.fetchval(
        "SELECT count(*) FROM charges WHERE payment_intent_id = $1", first["id"])
    assert charges == 2


async def test_425_until_applied_then_200(migrated: None) -> None:
    async with stack(processor=False) as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd", payment_method="pm_card_visa")
        assert created.status == 202
        intent_id = created.body["id"]
        early = await api.get(f"/v1/payment_intents/{intent_id}")
        assert early.status == 425
        assert early.headers["Retry-After"] == "1"
        assert early.error["type"] == "invalid_request_error"
        charge = await api.get(f"/v1/payment_intents/{intent_id}/charge")
        assert charge.status == 425
        # A confirm may follow an accepted create before it is applied; order is kept.
        confirmed = await api.post(f"/v1/payment_intents/{intent_id}/confirm")
        assert confirmed.status == 202, confirmed.body
        assert confirmed.body["status"] == "processing"
        await s.start_processor()
        done = await api.wait_for(intent_id)
        assert done["status"] == "succeeded"
        assert (await api.get(f"/v1/payment_intents/{intent_id}/charge")).status == 200


async def test_charge_425_while_processing(migrated: None) -> None:
    slow = make_settings(psp_latency_ms=(3000, 3000), psp_timeout_s=10.0, psp_lease_s=15.0)
    async with stack(slow) as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd", payment_method="pm_card_visa",
                                   confirm=True)
        charge = await api.get(f"/v1/payment_intents/{created.body['id']}/charge")
        assert charge.status == 425
        assert charge.headers["Retry-After"] == "1"
        seen = await api.wait_for(created.body["id"], ["processing", "succeeded"])
        if seen["status"] == "processing":
            charge = await api.get(f"/v1/payment_intents/{created.body['id']}/charge")
            assert charge.status == 425 or charge.body["status"] == "succeeded"
        await api.wait_for(created.body["id"], ["succeeded"])
        assert (await api.get(f"/v1/payment_intents/{created.body['id']}/charge")).status == 200


async def test_no_charge_before_confirm(api: Client) -> None:
    created = await api.create(amount=1000, currency="usd")
    await api.wait_for(created.body["id"], ["requires_payment_method"])
    charge = await api.get(f"/v1/payment_intents/{created.body['id']}/charge")
    assert charge.status == 404
    assert charge.error["code"] == "resource_missing"


async def test_events_are_published_in_order_with_stable_ids(shared: Stack, api: Client) -> None:
    topology = Topology(shared.settings.amqp_prefix, shared.settings.partitions)
    connection = await aio_pika.connect(shared.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(topology.events, routing_key="#")
        ok = await api.create(amount=100, currency="usd", payment_method="pm_card_visa",
                              confirm=True)
        bad = await api.create(amount=100, currency="usd", confirm=True,
                               payment_method="pm_card_visa_chargeDeclined")
        await api.wait_for(ok.body["id"])
        await api.wait_for(bad.body["id"])
        seen: dict[str, list[str]] = {ok.body["id"]: [], bad.body["id"]: []}
        event_ids: list[str] = []
        async with asyncio.timeout(20):
            while sum(map(len, seen.values())) < 8:
                message = await queue.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                await message.ack()
                event = orjson.loads(message.body)
                assert message.message_id == event["id"]
                obj = event["data"]["object"]
                is_intent = obj["object"] == "payment_intent"
                intent_id = obj["id"] if is_intent else obj["payment_intent"]
                if intent_id in seen:
                    assert event["object"] == "event" and event["id"].startswith("evt_")
                    assert event["request"]["id"].startswith("req_")
                    seen[intent_id].append(event["type"])
                    event_ids.append(event["id"])
    assert seen[ok.body["id"]] == ["payment_intent.created", "payment_intent.processing",
                                   "charge.succeeded", "payment_intent.succeeded"]
    assert seen[bad.body["id"]] == ["payment_intent.created", "payment_intent.processing",
                                    "charge.failed", "payment_intent.payment_failed"]
    assert len(set(event_ids)) == 8
    stored = await api.db.fetchval(
        "SELECT count(*) FROM events e WHERE e.account_id = $1 AND NOT EXISTS "
        "(SELECT FROM events_outbox o WHERE o.exchange = e.exchange AND o.seq = e.seq)",
        api.account_id)
    assert stored == 8


async def test_client_secret_is_derived_not_stored(api: Client, shared: Stack) -> None:
    created = await api.create(amount=100, currency="usd")
    secret = created.body["client_secret"]
    assert ids.client_secret_matches(shared.settings.secret_bytes, secret)
    tampered = secret[:-1] + ("y" if secret.endswith("x") else "x")
    assert not ids.client_secret_matches(shared.settings.secret_bytes, tampered)
    columns = await api.db.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'payment_intents'")
    assert "client_secret" not in {c["column_name"] for c in columns}


async def test_health_and_ready(api: Client) -> None:
    health = await api.get("/health", auth=None)
    assert health.status == 200 and health.body == {"status": "ok"}
    ready = await api.get("/ready", auth=None)
    assert ready.status == 200
    assert ready.body["checks"] == {"postgres": "ok", "redis": "ok", "rabbitmq": "ok",
                                    "rabbitmq_publisher": "ok", "edge_heartbeat": "ok",
                                    "edge_status_subscription": "ok"}


async def test_reads_never_go_back_behind_an_accepted_confirm(migrated: None) -> None:
    async with stack() as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd")
        await api.wait_for(created.body["id"], ["requires_payment_method"])
        await s.stop_processor()
        confirmed = await api.post(f"/v1/payment_intents/{created.body['id']}/confirm",
                                   {"payment_method": "pm_card_visa"})
        assert confirmed.status == 202
        read = await api.get(f"/v1/payment_intents/{created.body['id']}")
        assert read.status == 200
        assert read.body["status"] == "processing"
        assert read.body["payment_method"] == "pm_card_visa"
        stored = await api.db.fetchval("SELECT status FROM payment_intents WHERE id = $1",
                                       created.body["id"])
        assert stored == "requires_payment_method"
        assert (await api.get(f"/v1/payment_intents/{created.body['id']}/charge")).status == 425
        await s.start_processor()
        done = await api.wait_for(created.body["id"], ["succeeded"])
        assert done["latest_charge"]


async def test_metrics_and_processor_health(shared: Stack, api: Client) -> None:
    created = await api.create(amount=100, currency="usd", payment_method="pm_card_visa",
                               confirm=True)
    await api.wait_for(created.body["id"], ["succeeded"])
    edge = await api.get("/metrics", auth=None)
    assert edge.status == 200
    assert 'payonce_edge_requests_total{method="POST",route="/v1/payment_intents",status="202"}' \
        in edge.body
    assert shared.processor is not None and shared.processor.port
    base = f"http://127.0.0.1:{shared.processor.port}"
    async with api.session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    assert 'payonce_processor_commands_total{command="payment_intent.psp_result",' \
           'outcome="applied"}' in text
    assert 'payonce_processor_psp_calls_total{result="succeeded"}' in text
    for gauge in ("payonce_processor_outbox_lag_seconds", "payonce_processor_intents_stuck",
                  "payonce_dead_letter_queue_messages"):
        value = next(line for line in text.splitlines() if line.startswith(gauge + " "))
        assert float(value.split()[1]) >= 0, value  # read from the source, not NaN
    for path in ("/health", "/ready"):
        async with api.session.get(base + path) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
    async with api.session.get(f"{base}/ready") as resp:
        assert (await resp.json())["checks"] == {
            "postgres": "ok", "redis": "ok", "rabbitmq": "ok", "rabbitmq_publisher": "ok",
            "attempt_sweeper": "ok",
            "psp_task_sweeper": "ok", "refund_sweeper": "ok", "outbox_relay": "ok",
            "dead_letter_watcher": "ok", "status_fanout": "ok"}


async def test_the_processor_is_not_ready_while_it_cannot_publish(migrated: None) -> None:
    async with stack() as s:
        assert s.processor is not None and s.processor.publisher is not None
        url = f"http://127.0.0.1:{s.processor.port}/ready"
        # Its publishing channel closed under it (as the broker closes a channel on an error).
        await s.processor.publisher._channel.close()
        async with s.session.get(url) as resp:
            assert resp.status == 503
            checks = (await resp.json())["checks"]
        assert checks["rabbitmq_publisher"] == "unavailable" and checks["rabbitmq"] == "ok"
        # The next publish opens a new channel: a PSP result gets through, and it is ready again.
        api = await s.client()
        created = await api.create(amount=700, currency="usd", payment_method="pm_card_visa",
                                   confirm=True)
        await api.wait_for(created.body["id"], ["succeeded"])
        async with s.session.get(url) as resp:
            assert resp.status == 200, await resp.text()
