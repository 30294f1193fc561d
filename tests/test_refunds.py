"""Refunds: accepted pending (202), settled by the PSP, bounded by what was captured whatever
the races, refused with Stripe's errors when they cannot be made, listed and read back, with
their events, and driven by Stripe's own library."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

import aio_pika
import pytest
import stripe

from contracts import ids
from contracts.commands import CreateRefund
from contracts.topology import CommandPublisher, Topology
from edge.idempotency import fingerprint
from processor.batches import Intents
from tests import stripe_schema
from tests.conftest import Client, Stack, form, make_settings, stack
from tests.support import DECLINED, VISA
from tests.test_stripe_sdk import sdk

REFUND_FAIL = "pm_card_refundFail"
FINAL = ("succeeded", "failed")

PSP_REFUNDED = """
SELECT coalesce(sum(r.amount), 0) FROM psp.refunds r
JOIN payment_attempts a ON a.psp_key = r.charge_key
JOIN charges c ON c.attempt_id = a.id
WHERE c.id = $1 AND r.status = 'succeeded'
"""


async def paid(api: Client, amount: int = 2000, payment_method: str = VISA) -> dict[str, Any]:
    """A succeeded intent."""
    created = await api.create(amount=amount, currency="usd", payment_method=payment_method,
                               confirm=True)
    assert created.status == 202, created.body
    return await api.wait_for(created.body["id"], ["succeeded"])


async def refund(api: Client, key: str | None = None, **values: Any) -> Any:
    return await api.post("/v1/refunds", form(values), key=key or str(uuid.uuid4()))


async def wait_refund(api: Client, refund_id: str, statuses: tuple[str, ...] = FINAL,
                      within_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    last = None
    while time.monotonic() < deadline:
        last = await api.get(f"/v1/refunds/{refund_id}")
        if last.status == 200 and last.body["status"] in statuses:
            return last.body  # type: ignore[no-any-return]
        assert last.status in (200, 425), (last.status, last.body)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{refund_id} not in {statuses} after {within_s}s: {last}")


async def charge_of(api: Client, intent_id: str) -> dict[str, Any]:
    reply = await api.get(f"/v1/payment_intents/{intent_id}/charge")
    assert reply.status == 200, reply.body
    return reply.body  # type: ignore[no-any-return]


async def event_types(api: Client, object_id: str) -> list[str]:
    rows = await api.db.fetch(
        "SELECT type, data FROM events WHERE account_id = $1 AND object_id = $2 ORDER BY seq",
        api.account_id, object_id)
    for row in rows:
        stripe_schema.check(row["data"]["object"], row["data"])
    return [r["type"] for r in rows]


async def test_full_refund_of_an_intent(api: Client, caplog: pytest.LogCaptureFixture) -> None:
    intent = await paid(api, 2000)
    accepted = await refund(api, payment_intent=intent["id"], reason="requested_by_customer",
                            metadata={"ticket": "T-1"})
    assert accepted.status == 202, accepted.body
    body = accepted.body
    assert body["object"] == "refund" and body["id"].startswith("re_")
    assert body["status"] == "pending"
    assert body["amount"] == 2000 and body["currency"] == "usd"
    assert body["payment_intent"] == intent["id"]
    assert body["charge"] == intent["latest_charge"]
    assert body["reason"] == "requested_by_customer"
    assert body["metadata"] == {"ticket": "T-1"}

    done = await wait_refund(api, body["id"])
    assert done["status"] == "succeeded"
    assert {k: done[k] for k in ("amount", "charge", "created", "metadata", "reason")} == \
        {k: body[k] for k in ("amount", "charge", "created", "metadata", "reason")}
    assert "failure_reason" not in done
    # Its PSP answer was reported in one go, not resumed by the sweeper after an error.
    assert not [r for r in caplog.records if r.getMessage().startswith("attempt interrupted")]
    charge = await charge_of(api, intent["id"])
    assert charge["amount_refunded"] == 2000
    assert charge["refunded"] is True
    assert await api.db.fetchval(PSP_REFUNDED, charge["id"]) == 2000

    assert await event_types(api, body["id"]) == [
        "refund.created", "refund.updated", "charge.refund.updated"]
    charge_events = await api.db.fetch(
        "SELECT data, previous_attributes FROM events WHERE object_id = $1 "
        "AND type = 'charge.refunded'", charge["id"])
    assert len(charge_events) == 1
    assert charge_events[0]["data"]["amount_refunded"] == 2000
    assert charge_events[0]["previous_attributes"] == {"amount_refunded": 0, "refunded": False}
    # The intent itself is left as it was.
    after = await api.get(f"/v1/payment_intents/{intent['id']}")
    assert after.body["status"] == "succeeded" and after.body["amount_received"] == 2000


async def test_partial_and_multiple_refunds_up_to_the_captured_amount(api: Client) -> None:
    intent = await paid(api, 1000)
    charge_id = intent["latest_charge"]
    first = await refund(api, charge=charge_id, amount=300)
    assert first.status == 202, first.body
    assert first.body["payment_intent"] == intent["id"]
    second = await refund(api, payment_intent=intent["id"], amount=200)
    assert second.status == 202, second.body
    # No amount: what is left, counting the two accepted whether applied or not.
    rest = await refund(api, charge=charge_id)
    assert rest.status == 202, rest.body
    assert rest.body["amount"] == 500
    for accepted in (first, second, rest):
        assert (await wait_refund(api, accepted.body["id"]))["status"] == "succeeded"
    charge = await charge_of(api, intent["id"])
    assert charge["amount_refunded"] == 1000 and charge["refunded"] is True
    assert await api.db.fetchval(PSP_REFUNDED, charge_id) == 1000

    again = await refund(api, charge=charge_id, amount=1)
    assert again.status == 400
    assert again.error["code"] == "charge_already_refunded"
    assert again.error["message"] == f"Charge {charge_id} has already been refunded."


async def test_more_than_is_left_is_refused_at_the_edge(api: Client) -> None:
    intent = await paid(api, 1000)
    first = await refund(api, payment_intent=intent["id"], amount=700)
    assert first.status == 202
    over = await refund(api, payment_intent=intent["id"], amount=301)
    assert over.status == 400, over.body
    assert over.error["code"] == "amount_too_large"
    assert over.error["param"] == "amount"
    assert over.error["message"] == ("Refund amount ($3.01) is greater than unrefunded amount "
                                     "on charge ($3.00)")
    await wait_refund(api, first.body["id"])
    assert await api.db.fetchval(
        "SELECT count(*) FROM refunds WHERE account_id = $1", api.account_id) == 1


async def test_refunds_accepted_and_not_applied_count_at_the_edge(migrated: None) -> None:
    """With no processor running, an accepted refund is only a pending marker: the next one
    is still held to what it leaves, and reads of the first are 425 until it is applied."""
    async with stack() as s:
        api = await s.client()
        intent = await paid(api, 1000)
        await s.stop_processor()
        first = await refund(api, payment_intent=intent["id"], amount=800)
        assert first.status == 202, first.body
        early = await api.get(f"/v1/refunds/{first.body['id']}")
        assert early.status == 425 and early.headers["Retry-After"]
        over = await refund(api, payment_intent=intent["id"], amount=201)
        assert over.status == 400 and over.error["code"] == "amount_too_large", over.body
        fits = await refund(api, charge=intent["latest_charge"])
        assert fits.status == 202 and fits.body["amount"] == 200, fits.body
        # The intent reads as it is: refunds do not show on it.
        read = await api.get(f"/v1/payment_intents/{intent['id']}")
        assert read.status == 200 and read.body["status"] == "succeeded"
        await s.start_processor()
        for accepted in (first, fits):
            assert (await wait_refund(api, accepted.body["id"]))["status"] == "succeeded"
        assert (await charge_of(api, intent["id"]))["amount_refunded"] == 1000


async def refunds_of(api: Client, charge_id: str) -> list[Any]:
    return list(await api.db.fetch("SELECT * FROM refunds WHERE charge_id = $1", charge_id))


async def wait_all_final(api: Client, charge_id: str, count: int) -> list[Any]:
    deadline = time.monotonic() + 30
    while True:
        rows = await refunds_of(api, charge_id)
        if len(rows) == count and all(r["status"] in FINAL for r in rows):
            return rows
        assert time.monotonic() < deadline, [(r["id"], r["status"]) for r in rows]
        await asyncio.sleep(0.1)


async def test_racing_refunds_never_refund_more_than_captured(api: Client) -> None:
    intent = await paid(api, 2000)
    charge_id = intent["latest_charge"]
    answers = await asyncio.gather(*(refund(api, payment_intent=intent["id"], amount=300)
                                     for _ in range(20)))
    accepted = [a for a in answers if a.status == 202]
    refused = [a for a in answers if a.status != 202]
    assert accepted
    assert all(a.status == 400 and a.error["code"] in ("amount_too_large",
                                                        "charge_already_refunded")
               for a in refused), [a.body for a in refused]
    rows = await wait_all_final(api, charge_id, len(accepted))
    succeeded = sum(r["amount"] for r in rows if r["status"] == "succeeded")
    assert succeeded <= 2000
    assert len([r for r in rows if r["status"] == "succeeded"]) == 6  # 6 x 300 fit in 2000
    for r in rows:
        if r["status"] == "failed":
            assert r["failure_reason"] == "insufficient_refundable_amount"
    charge = await charge_of(api, intent["id"])
    assert charge["amount_refunded"] == succeeded
    assert await api.db.fetchval(PSP_REFUNDED, charge_id) == succeeded


async def test_racing_retries_of_one_refund_make_one_refund(api: Client) -> None:
    intent = await paid(api, 2000)
    key = str(uuid.uuid4())
    answers = await asyncio.gather(*(refund(api, key=key, payment_intent=intent["id"],
                                            amount=500) for _ in range(12)))
    assert {a.status for a in answers} <= {202, 409}, [a.body for a in answers]
    assert {a.body["id"] for a in answers if a.status == 202} == \
        {ids.refund_id(make_settings().secret_bytes, api.account_id, key)}
    again = await refund(api, key=key, payment_intent=intent["id"], amount=500)
    assert again.status == 202 and again.headers.get("Idempotent-Replayed") == "true"
    other = await refund(api, key=key, payment_intent=intent["id"], amount=501)
    assert other.status == 400 and other.error["type"] == "idempotency_error"
    rows = await wait_all_final(api, intent["latest_charge"], 1)
    assert rows[0]["status"] == "succeeded" and rows[0]["amount"] == 500
    assert await api.db.fetchval(PSP_REFUNDED, intent["latest_charge"]) == 500


async def test_refunds_the_edge_could_not_tell_apart_fail_without_moving_money(
        shared: Stack, api: Client) -> None:
    """Two refunds of the whole charge accepted by edges that did not see each other (sent
    straight to the partition): the first is made, the second fails and moves nothing."""
    intent = await paid(api, 1500)
    settings = shared.settings
    topology = Topology(settings.amqp_prefix, settings.partitions)
    commands = []
    for _ in range(2):
        key = str(uuid.uuid4())
        values = {"payment_intent": intent["id"], "amount": 1500}
        commands.append(CreateRefund(
            account_id=api.account_id, intent_id=intent["id"], request_id="req_race",
            accepted_at=int(time.time()), idempotency_key=key,
            fingerprint=fingerprint("POST", "/v1/refunds", values),
            refund_id=ids.refund_id(settings.secret_bytes, api.account_id, key),
            charge_id=intent["latest_charge"], amount=1500))
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        publisher = CommandPublisher(await connection.channel(publisher_confirms=True),
                                     topology, 5.0)
        for command in commands:
            await publisher.publish(command)
    # Published without an edge, they have no pending markers: found once applied.
    await wait_all_final(api, intent["latest_charge"], 2)
    made = await wait_refund(api, commands[0].refund_id)
    refused = await wait_refund(api, commands[1].refund_id)
    assert made["status"] == "succeeded"
    assert refused["status"] == "failed"
    assert refused["failure_reason"] == "insufficient_refundable_amount"
    assert await event_types(api, refused["id"]) == ["refund.created", "refund.failed"]
    assert (await charge_of(api, intent["id"]))["amount_refunded"] == 1500
    assert await api.db.fetchval(PSP_REFUNDED, intent["latest_charge"]) == 1500
    assert await api.db.fetchval("SELECT count(*) FROM psp.refunds WHERE idempotency_key = $1",
                                 f"payonce_{refused['id']}") == 0


async def test_refund_fail_card_succeeds_then_fails(api: Client) -> None:
    intent = await paid(api, 1200, REFUND_FAIL)
    accepted = await refund(api, payment_intent=intent["id"], amount=1000)
    assert accepted.status == 202
    succeeded = await wait_refund(api, accepted.body["id"], ("succeeded", "failed"))
    assert succeeded["status"] == "succeeded"
    failed = await wait_refund(api, accepted.body["id"], ("failed",))
    assert failed["failure_reason"] == "expired_or_canceled_card"
    charge = await charge_of(api, intent["id"])
    assert charge["amount_refunded"] == 0 and charge["refunded"] is False
    assert await api.db.fetchval(PSP_REFUNDED, charge["id"]) == 0
    assert await event_types(api, failed["id"]) == [
        "refund.created", "refund.updated", "charge.refund.updated", "refund.failed",
        "refund.updated", "charge.refund.updated"]
    failed_event = await api.db.fetchrow(
        "SELECT data, previous_attributes FROM events WHERE object_id = $1 "
        "AND type = 'refund.failed'", failed["id"])
    assert failed_event["previous_attributes"] == {"status": "succeeded"}
    # The money is back on the charge: it can be refunded again.
    retry = await refund(api, payment_intent=intent["id"])
    assert retry.status == 202 and retry.body["amount"] == 1200, retry.body


async def test_no_refund_without_a_captured_charge(api: Client) -> None:
    declined = await api.create(amount=900, currency="usd", payment_method=DECLINED,
                                confirm=True)
    done = await api.wait_for(declined.body["id"], ["requires_payment_method"])
    by_intent = await refund(api, payment_intent=done["id"])
    assert by_intent.status == 400
    assert by_intent.error["code"] == "payment_intent_unexpected_state"
    assert by_intent.error["param"] == "payment_intent"
    assert by_intent.error["message"] == (
        f"This PaymentIntent ({done['id']}) does not have a successful charge to refund: it "
        "has a status of requires_payment_method.")
    by_charge = await refund(api, charge=done["latest_charge"])
    assert by_charge.status == 400
    assert by_charge.error["code"] == "charge_not_refundable"
    assert by_charge.error["param"] == "charge"

    waiting = await api.create(amount=900, currency="usd")
    await api.wait_for(waiting.body["id"], ["requires_payment_method"])
    unconfirmed = await refund(api, payment_intent=waiting.body["id"])
    assert unconfirmed.status == 400
    assert "requires_payment_method" in unconfirmed.error["message"]

    processing = await api.create(amount=900, currency="usd", payment_method=VISA,
                                  confirm=True)
    early = await refund(api, payment_intent=processing.body["id"])
    # Accepted and not applied, or applied and still processing: either way not refundable.
    assert early.status == 400 and early.error["code"] == "payment_intent_unexpected_state"
    assert await api.db.fetchval(
        "SELECT count(*) FROM refunds WHERE account_id = $1", api.account_id) == 0


INVALID: list[tuple[dict[str, Any], int, str, str | None, str]] = [
    ({}, 400, "parameter_missing", "payment_intent",
     "One of the following params should be provided for this request: payment_intent or "
     "charge."),
    ({"payment_intent": "PI", "charge": "CH"}, 400, "invalid_request", "charge",
     "You may only specify one of these parameters: charge, payment_intent."),
    ({"payment_intent": "PI", "amount": "0"}, 400, "parameter_invalid_integer", "amount",
     "Invalid positive integer"),
    ({"payment_intent": "PI", "amount": "-5"}, 400, "parameter_invalid_integer", "amount",
     "Invalid positive integer"),
    ({"payment_intent": "PI", "amount": "ten"}, 400, "parameter_invalid_integer", "amount",
     "Invalid integer: ten."),
    ({"payment_intent": "PI", "amount": "1.5"}, 400, "parameter_invalid_integer", "amount",
     "Invalid integer: 1.5."),
    ({"payment_intent": "PI", "amount": "100000000"}, 400, "amount_too_large", "amount",
     "Amount must be no more than 99,999,999 in the currency's smallest unit."),
    ({"payment_intent": "PI", "reason": "changed_mind"}, 400, "parameter_invalid", "reason",
     "Invalid reason: must be one of duplicate, fraudulent, or requested_by_customer"),
    ({"payment_intent": "PI", "metadata[" + "k" * 41 + "]": "v"}, 400, "parameter_invalid",
     "metadata[" + "k" * 41 + "]", "Metadata keys can be at most 40 characters."),
    ({"payment_intent": "PI", "metadata": "text"}, 400, "parameter_invalid", "metadata",
     "Invalid metadata: it must be a hash of keys to strings."),
    ({"payment_intent": "PI", "currency": "usd"}, 400, "parameter_unknown", "currency",
     "Received unknown parameter: currency"),
    ({"payment_intent": "x" * 256}, 400, "parameter_invalid", "payment_intent",
     "payment_intent must be at most 255 characters."),
    ({"payment_intent": "pi_" + "a" * 24}, 404, "resource_missing", "payment_intent",
     "No such payment_intent: 'pi_aaaaaaaaaaaaaaaaaaaaaaaa'"),
    ({"payment_intent": "nope"}, 404, "resource_missing", "payment_intent",
     "No such payment_intent: 'nope'"),
    ({"charge": "ch_" + "a" * 24}, 404, "resource_missing", "charge",
     "No such charge: 'ch_aaaaaaaaaaaaaaaaaaaaaaaa'"),
    ({"charge": "nope"}, 404, "resource_missing", "charge", "No such charge: 'nope'"),
]


@pytest.mark.parametrize(("values", "status", "code", "param", "message"), INVALID)
async def test_every_parameter_is_validated(api: Client, values: dict[str, Any], status: int,
                                            code: str, param: str | None, message: str) -> None:
    intent = await paid(api, 500)
    raw = {k: (intent["id"] if v == "PI" else intent["latest_charge"] if v == "CH" else v)
           for k, v in values.items()}
    reply = await api.post("/v1/refunds", raw)
    assert reply.status == status, reply.body
    assert reply.error["code"] == code
    assert reply.error.get("param") == param
    if message:
        assert reply.error["message"] == message
    assert await api.db.fetchval(
        "SELECT count(*) FROM refunds WHERE account_id = $1", api.account_id) == 0


async def test_a_post_needs_an_idempotency_key(api: Client) -> None:
    intent = await paid(api, 500)
    reply = await api.post("/v1/refunds", {"payment_intent": intent["id"]}, key=None)
    assert reply.status == 400 and reply.error["param"] == "Idempotency-Key"


async def test_another_accounts_objects_are_not_found(shared: Stack, api: Client) -> None:
    intent = await paid(api, 700)
    done = await refund(api, payment_intent=intent["id"])
    await wait_refund(api, done.body["id"])
    other = await shared.client()
    assert (await refund(other, payment_intent=intent["id"])).status == 404
    assert (await refund(other, charge=intent["latest_charge"])).status == 404
    assert (await other.get(f"/v1/refunds/{done.body['id']}")).status == 404
    listed = await other.get("/v1/refunds")
    assert listed.status == 200 and listed.body["data"] == []


async def test_retrieve_and_list(api: Client) -> None:
    first, second = await paid(api, 1000), await paid(api, 800)
    made = []
    for intent, amount in ((first, 100), (first, 200), (second, 300), (first, 400)):
        accepted = await refund(api, payment_intent=intent["id"], amount=amount)
        assert accepted.status == 202
        made.append(await wait_refund(api, accepted.body["id"]))
    newest_first = [r["id"] for r in reversed(made)]

    got = await api.get(f"/v1/refunds/{made[0]['id']}")
    assert got.status == 200 and got.body == made[0]
    missing = await api.get("/v1/refunds/re_" + "b" * 24)
    assert missing.status == 404 and missing.error["code"] == "resource_missing"
    assert (await api.get("/v1/refunds/nope")).status == 404
    assert (await api.get(f"/v1/refunds/{made[0]['id']}?expand=x")).status == 400

    listed = await api.get("/v1/refunds")
    assert listed.status == 200
    assert listed.body["object"] == "list" and listed.body["url"] == "/v1/refunds"
    assert [r["id"] for r in listed.body["data"]] == newest_first
    assert listed.body["has_more"] is False
    for r in listed.body["data"]:
        stripe_schema.check("refund", r)

    by_intent = await api.get(f"/v1/refunds?payment_intent={first['id']}")
    assert [r["id"] for r in by_intent.body["data"]] == [made[3]["id"], made[1]["id"],
                                                         made[0]["id"]]
    by_charge = await api.get(f"/v1/refunds?charge={second['latest_charge']}")
    assert [r["id"] for r in by_charge.body["data"]] == [made[2]["id"]]
    created = made[0]["created"]
    future = await api.get(f"/v1/refunds?created[gt]={created + 3600}")
    assert future.body["data"] == []
    since = await api.get(f"/v1/refunds?created[gte]={created}")
    assert len(since.body["data"]) == 4

    page = await api.get("/v1/refunds?limit=2")
    assert [r["id"] for r in page.body["data"]] == newest_first[:2] and page.body["has_more"]
    after = await api.get(f"/v1/refunds?limit=2&starting_after={newest_first[1]}")
    assert [r["id"] for r in after.body["data"]] == newest_first[2:]
    assert after.body["has_more"] is False
    before = await api.get(f"/v1/refunds?limit=1&ending_before={newest_first[2]}")
    assert [r["id"] for r in before.body["data"]] == [newest_first[1]]
    assert before.body["has_more"] is True

    both = await api.get(f"/v1/refunds?starting_after={made[0]['id']}&"
                         f"ending_before={made[1]['id']}")
    assert both.status == 400 and both.error["param"] == "ending_before"
    for bad, param in (("limit=0", "limit"), ("limit=101", "limit"), ("status=x", "status"),
                       ("starting_after=re_" + "c" * 24, "starting_after"),
                       ("created[after]=1", "created[after]")):
        reply = await api.get(f"/v1/refunds?{bad}")
        assert reply.status == 400 and reply.error["param"] == param, (bad, reply.body)


def sdk_flow(base: str, key: str, intent_id: str, charge_id: str) -> None:
    client = sdk(base, key)
    created = client.refunds.create(params={"payment_intent": intent_id, "amount": 400,
                                            "reason": "duplicate", "metadata": {"n": "1"}})
    assert isinstance(created, stripe.Refund)
    assert created.status == "pending" and created.amount == 400
    second = client.refunds.create(params={"charge": charge_id})
    assert second.amount == 600
    deadline = time.monotonic() + 30
    while client.refunds.retrieve(created.id).status == "pending" or \
            client.refunds.retrieve(second.id).status == "pending":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    got = client.refunds.retrieve(created.id)
    assert got.status == "succeeded" and got.reason == "duplicate"
    assert got.metadata["n"] == "1"
    listed = list(client.refunds.list(params={"payment_intent": intent_id, "limit": 1})
                  .auto_paging_iter())
    assert [r.id for r in listed] == [second.id, created.id]
    with pytest.raises(stripe.InvalidRequestError) as over:
        client.refunds.create(params={"payment_intent": intent_id, "amount": 1})
    assert over.value.code == "charge_already_refunded"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.refunds.retrieve("re_" + "d" * 24)
    assert missing.value.http_status == 404


async def test_official_library(shared: Stack, api: Client) -> None:
    intent = await paid(api, 1000)
    await asyncio.to_thread(sdk_flow, shared.base_url.rstrip("/"), api.secret_key,
                            intent["id"], intent["latest_charge"])


async def test_refunds_converge_through_psp_errors_and_lost_replies(migrated: None) -> None:
    """A PSP that fails and loses replies: each refund is retried with its own key until it
    is answered, and the PSP's books hold each refund once."""
    settings = make_settings(psp_error_rate=0.3, psp_lost_reply_rate=0.3, psp_timeout_s=0.5,
                             psp_lease_s=1.0)
    async with stack(settings) as s:
        api = await s.client()
        intent = await paid(api, 3000)
        accepted = [await refund(api, payment_intent=intent["id"], amount=amount)
                    for amount in (500, 700, 900)]
        assert [a.status for a in accepted] == [202, 202, 202]
        for a in accepted:
            assert (await wait_refund(api, a.body["id"], within_s=60))["status"] == "succeeded"
        books = await api.db.fetch(
            "SELECT idempotency_key, amount FROM psp.refunds WHERE idempotency_key = ANY($1)",
            [f"payonce_{a.body['id']}" for a in accepted])
        assert sorted(b["amount"] for b in books) == [500, 700, 900]
        assert await api.db.fetchval(PSP_REFUNDED, intent["latest_charge"]) == 2100
        assert (await charge_of(api, intent["id"]))["amount_refunded"] == 2100


async def test_the_single_command_path_applies_a_refund_once(shared: Stack, api: Client) -> None:
    """The path a redelivered command takes (a batch of one), and a duplicate of it."""

    intent = await paid(api, 900)
    settings = shared.settings
    # Another exchange: this refund's PSP task is left alone by the shared stack's processor.
    topology = Topology(f"{settings.amqp_prefix}.single", settings.partitions)
    key = str(uuid.uuid4())
    values = {"payment_intent": intent["id"], "amount": 400}
    command = CreateRefund(
        account_id=api.account_id, intent_id=intent["id"], request_id="req_single",
        accepted_at=int(time.time()), idempotency_key=key,
        fingerprint=fingerprint("POST", "/v1/refunds", values),
        refund_id=ids.refund_id(settings.secret_bytes, api.account_id, key),
        charge_id=intent["latest_charge"], amount=400)
    intents = Intents(api.db, settings.secret_bytes, topology, settings.psp_lease_s)
    first = await intents.apply(command)
    assert (first.outcome, first.refunds) == ("applied", [command.refund_id])
    again = await intents.apply(command)
    assert again.outcome == "duplicate"
    rows = await refunds_of(api, intent["latest_charge"])
    assert [(r["id"], r["status"], r["amount"]) for r in rows] == \
        [(command.refund_id, "pending", 400)]
    assert (await charge_of(api, intent["id"]))["amount_refunded"] == 400
    assert await event_types(api, command.refund_id) == ["refund.created"]
    too_much = dataclasses.replace(
        command, idempotency_key=key + "-2", amount=501,
        refund_id=ids.refund_id(settings.secret_bytes, api.account_id, key + "-2"))
    failed = await intents.apply(too_much)
    assert failed.outcome == "applied" and not failed.refunds
    row = await api.db.fetchrow("SELECT * FROM refunds WHERE id = $1", too_much.refund_id)
    assert (row["status"], row["failure_reason"]) == ("failed", "insufficient_refundable_amount")


async def test_a_key_redis_forgot_is_answered_from_postgres(shared: Stack, api: Client) -> None:
    intent = await paid(api, 600)
    key = str(uuid.uuid4())
    first = await refund(api, key=key, payment_intent=intent["id"], amount=250)
    assert first.status == 202
    await wait_refund(api, first.body["id"])
    await shared.redis.delete(f"idem:{api.account_id}:{key}")
    again = await refund(api, key=key, payment_intent=intent["id"], amount=250)
    assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.body["id"] == first.body["id"] and again.body["status"] == "succeeded"
    other = await refund(api, key=key, payment_intent=intent["id"], amount=251)
    assert other.status == 400 and other.error["type"] == "idempotency_error"
    assert len(await refunds_of(api, intent["latest_charge"])) == 1
