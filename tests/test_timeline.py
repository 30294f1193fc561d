"""`GET /v1/payment_intents/{id}/timeline` tells what happened to an intent, in order: the
commands applied, its transitions, its PSP attempts and results, its events and their webhook
deliveries; the same entries `payonce trace` prints (ops/timeline.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator

from contracts import schemas
from tests.conftest import Client, Stack, make_settings, stack
from tests.support import DECLINED, VISA, create
from tests.webhook_support import Hit, Receiver, add_endpoint, all_finished, eventually


def check_schema(body: Any) -> None:
    root = {"$ref": "#/$defs/payment_intent_timeline", "$defs": schemas.components()}
    validator = Draft202012Validator(orjson.loads(
        orjson.dumps(root).decode().replace(schemas.REF, "#/$defs/")))
    problems = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]
    assert not problems, problems


@pytest.fixture(scope="module")
async def delivering(migrated: None) -> AsyncIterator[tuple[Stack, Receiver]]:
    """A stack with a webhook dispatcher, and a receiver that fails each event's first try."""
    receiver = await Receiver().start()

    async def first_fails(hit: Hit) -> web.StreamResponse:
        tries = sum(1 for h in receiver.hits if h.event["id"] == hit.event["id"])
        return web.Response(status=500 if tries == 1 else 200)

    receiver.handlers["hooks"] = first_fails
    settings = make_settings(webhook_retry_schedule="0.2,0.4", webhook_timeout_s=2.0)
    try:
        async with stack(settings, dispatcher=True) as s:
            yield s, receiver
    finally:
        await receiver.stop()


async def timeline_of(api: Client, intent_id: str) -> list[dict[str, Any]]:
    reply = await api.get(f"/v1/payment_intents/{intent_id}/timeline")
    assert reply.status == 200, reply.body
    check_schema(reply.body)
    assert reply.body["object"] == "list" and reply.body["has_more"] is False
    assert reply.body["url"] == f"/v1/payment_intents/{intent_id}/timeline"
    entries: list[dict[str, Any]] = reply.body["data"]
    assert [e["time"] for e in entries] == sorted(e["time"] for e in entries)
    return entries


def kinds(entries: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["type"] == kind]


def position(entries: list[dict[str, Any]], **wanted: Any) -> int:
    return next(i for i, e in enumerate(entries)
                if all(e.get(k) == v for k, v in wanted.items()))


async def test_a_settled_payment(delivering: tuple[Stack, Receiver]) -> None:
    s, receiver = delivering
    api = await s.client()
    endpoint_id, _ = await add_endpoint(s.db, s.settings, api.account_id,
                                        receiver.url("hooks"))
    key = "timeline-settled"
    intent_id = await create(api, 4321, VISA, confirm_separately=True, key=key)
    await api.wait_for(intent_id, ["succeeded"])
    # Four events, each failed once and then delivered.
    await eventually(lambda: all_finished(s.db, endpoint_id, 4), "every event delivered")
    entries = await timeline_of(api, intent_id)

    commands = kinds(entries, "command")
    assert [c["command"] for c in commands] == ["payment_intent.create",
                                                "payment_intent.confirm"]
    assert all(c["outcome"] == "applied" and c["error"] is None for c in commands)
    assert commands[0]["idempotency_key"] == key
    assert all(c["request_id"] for c in commands)

    assert [(t["from"], t["to"]) for t in kinds(entries, "transition")] == [
        (None, "requires_confirmation"), ("requires_confirmation", "processing"),
        ("processing", "succeeded")]
    assert [e["event_type"] for e in kinds(entries, "event")] == [
        "payment_intent.created", "payment_intent.processing", "charge.succeeded",
        "payment_intent.succeeded"]
    assert all(e["published"] for e in kinds(entries, "event"))

    started, = kinds(entries, "attempt_created")
    result, = kinds(entries, "psp_result")
    settled = kinds(entries, "attempt_updated")[-1]
    assert started["amount"] == 4321 and started["payment_method"] == VISA
    assert result["attempt"] == started["attempt"] and result["outcome"] == "captured"
    assert result["authorization_code"]
    assert settled["state"] == "settled" and settled["result"]["succeeded"] is True

    webhooks = kinds(entries, "webhook_attempt")
    assert len(webhooks) == 8
    assert {w["webhook_endpoint"] for w in webhooks} == {endpoint_id}
    for event in kinds(entries, "event"):
        tries = [w for w in webhooks if w["event"] == event["event"]]
        assert [(w["attempt"], w["status_code"]) for w in tries] == [(1, 500), (2, 200)]
        # Delivered after it happened.
        assert position(entries, type="webhook_attempt", event=event["event"]) > \
            position(entries, type="event", event=event["event"])

    # In the order it happened.
    order = [
        position(entries, type="command", command="payment_intent.create"),
        position(entries, type="transition", to="requires_confirmation"),
        position(entries, type="command", command="payment_intent.confirm"),
        position(entries, type="attempt_created"),
        position(entries, type="transition", to="processing"),
        position(entries, type="event", event_type="payment_intent.processing"),
        position(entries, type="psp_result"),
        position(entries, type="transition", to="succeeded"),
        position(entries, type="event", event_type="payment_intent.succeeded"),
    ]
    assert order == sorted(order)
    # Each transition just before the event that tells it.
    for transition in kinds(entries, "transition"):
        at = entries.index(transition)
        assert entries[at + 1]["type"] == "event"
        assert entries[at + 1]["event"] == transition["event"]


async def test_a_declined_payment(api: Client) -> None:
    intent_id = await create(api, 1234, DECLINED, confirm_separately=False)
    await api.wait_for(intent_id, ["requires_payment_method"])
    entries = await timeline_of(api, intent_id)
    assert [c["command"] for c in kinds(entries, "command")] == ["payment_intent.create"]
    # A create with confirm=true takes requires_confirmation first, as its events tell.
    assert [(t["from"], t["to"]) for t in kinds(entries, "transition")] == [
        (None, "requires_confirmation"), ("requires_confirmation", "processing"),
        ("processing", "requires_payment_method")]
    assert [e["event_type"] for e in kinds(entries, "event")] == [
        "payment_intent.created", "payment_intent.processing", "charge.failed",
        "payment_intent.payment_failed"]
    result, = kinds(entries, "psp_result")
    assert result["outcome"] == "declined" and result["decline_code"] == "generic_decline"
    assert result["authorization_code"] is None
    settled = kinds(entries, "attempt_updated")[-1]
    assert settled["state"] == "settled"
    assert settled["result"]["succeeded"] is False
    assert settled["result"]["decline_code"] == "generic_decline"
    assert kinds(entries, "webhook_attempt") == []  # no endpoint
    order = [position(entries, type="command"), position(entries, type="attempt_created"),
             position(entries, type="psp_result"),
             position(entries, type="event", event_type="charge.failed"),
             position(entries, type="transition", to="requires_payment_method"),
             position(entries, type="event", event_type="payment_intent.payment_failed")]
    assert order == sorted(order)


async def test_unknown_and_other_accounts_intents(api: Client, shared: Stack) -> None:
    intent_id = await create(api, 1000, VISA, confirm_separately=False)
    await api.wait_for(intent_id, ["succeeded"])
    stranger = await shared.client()
    for client, target in ((stranger, intent_id), (api, "pi_" + "0" * 24), (api, "nope")):
        reply = await client.get(f"/v1/payment_intents/{target}/timeline")
        assert reply.status == 404, reply.body
        assert reply.error["code"] == "resource_missing"
        assert reply.error["message"] == f"No such payment_intent: '{target}'"
    unknown = await api.get(f"/v1/payment_intents/{intent_id}/timeline?limit=3")
    assert unknown.status == 400 and unknown.error["code"] == "parameter_unknown"


async def test_425_while_the_create_is_not_applied(migrated: None) -> None:
    async with stack(processor=False) as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd")
        reply = await api.get(f"/v1/payment_intents/{created.body['id']}/timeline")
        assert reply.status == 425 and reply.error["code"] == "resource_not_ready"
        assert reply.headers["Retry-After"] == "1"
        await s.start_processor()
        await api.wait_for(created.body["id"], ["requires_payment_method"])
        entries = await timeline_of(api, created.body["id"])
        assert [e["type"] for e in entries] == ["command", "transition", "event"]
