"""The PaymentIntent lifecycle past create and confirm: manual capture (full and partial),
cancel from every state that allows it, updates, the authorization's expiry, and every
transition the table forbids, with Stripe's wording; the PSP's books checked for each."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from contracts.commands import CancelIntent, CaptureIntent, UpdateIntent
from edge import params
from tests.conftest import Client, form, make_settings, stack
from tests.lifecycle_support import (
    VISA,
    authorized,
    books,
    charge_of,
    event_types,
    expect,
    inbox_outcomes,
    settled,
)
from tests.test_poison import broker, publish_raw
from tests.test_validation import assert_error

CANCELABLE = ("requires_payment_method, requires_capture, requires_confirmation, "
              "requires_action, processing")


async def test_manual_capture_of_everything(api: Client) -> None:
    intent = await authorized(api, 1500, metadata={"order": "7"})
    assert (intent["amount_capturable"], intent["amount_received"]) == (1500, 0)
    charge = await charge_of(api, intent["id"])
    assert (charge["status"], charge["captured"], charge["amount_captured"]) == \
        ("succeeded", False, 0)
    assert charge["outcome"]["type"] == "authorized"

    capturing = expect(await api.post(f"/v1/payment_intents/{intent['id']}/capture"))
    assert (capturing["status"], capturing["amount_capturable"]) == ("processing", 1500)
    done = await settled(api, intent["id"], "succeeded")
    assert (done["amount_received"], done["amount_capturable"]) == (1500, 0)
    assert done["metadata"] == {"order": "7"}
    charge = await charge_of(api, intent["id"])
    assert (charge["captured"], charge["amount_captured"], charge["amount_refunded"],
            charge["refunded"]) == (True, 1500, 0, False)

    [book] = await books(api, intent["id"])
    assert (book["outcome"], list(book["kinds"]), book["captured_later"]) == \
        ("authorized", ["capture"], 1500)
    assert await event_types(api, intent["id"], charge["id"]) == [
        "payment_intent.created", "payment_intent.processing", "charge.succeeded",
        "payment_intent.amount_capturable_updated", "charge.captured",
        "payment_intent.succeeded"]


async def test_partial_capture_releases_the_rest(api: Client) -> None:
    intent = await authorized(api, 1000)
    capturing = await api.post(f"/v1/payment_intents/{intent['id']}/capture",
                               {"amount_to_capture": "600"})
    assert expect(capturing)["status"] == "processing"
    done = await settled(api, intent["id"], "succeeded")
    assert (done["amount"], done["amount_received"], done["amount_capturable"]) == (1000, 600, 0)
    charge = await charge_of(api, intent["id"])
    assert (charge["amount_captured"], charge["amount_refunded"], charge["captured"],
            charge["refunded"]) == (600, 400, True, False)
    [book] = await books(api, intent["id"])
    # captured - released is what moved: 600 of the 1000 authorized, once.
    assert (list(book["kinds"]), book["captured_later"], book["voided"]) == (["capture"], 600, 0)


async def test_capture_refusals(api: Client) -> None:
    intent = await authorized(api, 1000)
    path = f"/v1/payment_intents/{intent['id']}/capture"
    too_much = await api.post(path, {"amount_to_capture": "1001"})
    assert_error(too_much, 400, "amount_too_large", "amount_to_capture")
    assert "amount_capturable (1000)" in too_much.error["message"]
    assert_error(await api.post(path, {"amount_to_capture": "0"}), 400,
                 "parameter_invalid_integer", "amount_to_capture")
    assert_error(await api.post(path, {"amount_to_capture": "20"}), 400, "amount_too_small",
                 "amount_to_capture")
    assert_error(await api.post(path, {"amount": "20"}), 400, "parameter_unknown", "amount")

    expect(await api.post(path))
    # While the capture runs the intent is processing: neither a second capture nor a cancel.
    again = await api.post(path)
    assert_error(again, 400, "payment_intent_unexpected_state", None)
    assert again.error["message"] == (
        "This PaymentIntent could not be captured because it has a status of processing. Only "
        "a PaymentIntent with one of the following statuses may be captured: "
        "requires_capture.")
    cancel = await api.post(f"/v1/payment_intents/{intent['id']}/cancel")
    assert_error(cancel, 400, "payment_intent_unexpected_state", None)
    assert cancel.error["message"].startswith(
        "You cannot cancel this PaymentIntent because it has a status of processing.")
    await settled(api, intent["id"], "succeeded")
    again = await api.post(path)
    assert_error(again, 400, "payment_intent_unexpected_state", None)
    assert "status of succeeded" in again.error["message"]
    [book] = await books(api, intent["id"])
    assert list(book["kinds"]) == ["capture"]


async def test_capture_of_an_automatic_or_unconfirmed_intent_is_refused(api: Client) -> None:
    fresh = expect(await api.create(amount=1000, currency="usd"))
    refused = await api.post(f"/v1/payment_intents/{fresh['id']}/capture")
    assert_error(refused, 400, "payment_intent_unexpected_state", None)
    assert "status of requires_payment_method" in refused.error["message"]
    paid = expect(await api.create(amount=1000, currency="usd", payment_method=VISA,
                                   confirm=True))
    assert paid["capture_method"] == "automatic"
    await settled(api, paid["id"], "succeeded")
    refused = await api.post(f"/v1/payment_intents/{paid['id']}/capture")
    assert "status of succeeded" in refused.error["message"]


@pytest.mark.parametrize("given", [
    {}, {"payment_method": VISA}, {"payment_method": "pm_card_visa_chargeDeclined"}])
async def test_cancel_before_any_authorization(api: Client, given: dict[str, str]) -> None:
    """From requires_payment_method and requires_confirmation, and after a decline."""
    intent = expect(await api.create(amount=1000, currency="usd", **given))
    if given.get("payment_method", "").endswith("Declined"):
        expect(await api.post(f"/v1/payment_intents/{intent['id']}/confirm"))
        intent = await settled(api, intent["id"], "requires_payment_method")
    before = intent["status"]
    canceled = expect(await api.post(f"/v1/payment_intents/{intent['id']}/cancel",
                                     {"cancellation_reason": "requested_by_customer"}))
    assert (canceled["status"], canceled["cancellation_reason"]) == \
        ("canceled", "requested_by_customer")
    assert isinstance(canceled["canceled_at"], int)
    done = await settled(api, intent["id"], "canceled")
    assert (done["canceled_at"], done["cancellation_reason"]) == \
        (canceled["canceled_at"], "requested_by_customer")
    events = await api.db.fetch(
        "SELECT type, previous_attributes FROM events WHERE object_id = $1 ORDER BY seq",
        intent["id"])
    assert (events[-1]["type"], events[-1]["previous_attributes"]) == \
        ("payment_intent.canceled", {"status": before})
    for book in await books(api, intent["id"]):
        assert list(book["kinds"]) == []


async def test_cancel_of_a_held_authorization_releases_it(api: Client) -> None:
    intent = await authorized(api, 2000)
    canceled = expect(await api.post(f"/v1/payment_intents/{intent['id']}/cancel",
                                     {"cancellation_reason": "abandoned"}))
    assert (canceled["status"], canceled["amount_capturable"]) == ("canceled", 0)
    done = await settled(api, intent["id"], "canceled")
    assert (done["amount_received"], done["amount_capturable"], done["cancellation_reason"]) == \
        (0, 0, "abandoned")
    charge = await charge_of(api, intent["id"])
    assert (charge["captured"], charge["amount_refunded"], charge["refunded"]) == \
        (False, 2000, True)
    [book] = await books(api, intent["id"])
    assert (list(book["kinds"]), book["voided"], book["captured_later"]) == (["void"], 2000, 0)
    assert (await event_types(api, intent["id"], charge["id"]))[-2:] == [
        "payment_intent.canceled", "charge.refunded"]


@pytest.mark.parametrize("capture_method", ["automatic", "manual"])
async def test_cancel_while_processing_wins(capture_method: str, migrated: None) -> None:
    """The PSP answers long after the cancel is applied: the authorization it brings back is
    voided (reversed, once captured), and the intent stays canceled."""
    async with stack(make_settings(psp_latency_ms=(500, 700))) as s:
        api = await s.client()
        created = expect(await api.create(amount=3000, currency="usd", payment_method=VISA,
                                          confirm=True, capture_method=capture_method))
        canceled = expect(await api.post(f"/v1/payment_intents/{created['id']}/cancel",
                                         {"cancellation_reason": "duplicate"}))
        assert canceled["status"] == "canceled"
        done = await settled(api, created["id"], "canceled")
        assert (done["cancellation_reason"], done["amount_received"], done["status"]) == \
            ("duplicate", 0, "canceled")
        assert await inbox_outcomes(api, created["id"]) == {
            "payment_intent.create": ["applied"], "payment_intent.cancel": ["applied"]}
        charge = await charge_of(api, created["id"])
        assert (charge["status"], charge["amount_refunded"], charge["refunded"]) == \
            ("succeeded", 3000, True)
        [book] = await books(api, created["id"])
        if capture_method == "manual":
            assert (book["outcome"], list(book["kinds"]), book["voided"]) == \
                ("authorized", ["void"], 3000)
        else:
            assert (book["outcome"], list(book["kinds"]), book["reversed"]) == \
                ("captured", ["reverse"], 3000)
        types = await event_types(api, created["id"], charge["id"])
        assert "payment_intent.succeeded" not in types
        assert types[-3:] == ["payment_intent.canceled", "charge.succeeded", "charge.refunded"]


async def test_cancel_of_a_succeeded_or_canceled_intent(api: Client) -> None:
    paid = expect(await api.create(amount=1000, currency="usd", payment_method=VISA,
                                   confirm=True))
    await settled(api, paid["id"], "succeeded")
    refused = await api.post(f"/v1/payment_intents/{paid['id']}/cancel")
    assert_error(refused, 400, "payment_intent_unexpected_state", None)
    assert refused.error["message"] == (
        "You cannot cancel this PaymentIntent because it has a status of succeeded. Only a "
        f"PaymentIntent with one of the following statuses may be canceled: {CANCELABLE}.")
    gone = expect(await api.create(amount=1000, currency="usd"))
    expect(await api.post(f"/v1/payment_intents/{gone['id']}/cancel"))
    # Refused at the edge at once, from the accepted cancel, before it is applied.
    again = await api.post(f"/v1/payment_intents/{gone['id']}/cancel")
    assert "status of canceled" in again.error["message"]
    await settled(api, gone["id"], "canceled")
    for action, body in (("confirm", {"payment_method": VISA}), ("capture", {})):
        refused = await api.post(f"/v1/payment_intents/{gone['id']}/{action}", body)
        assert_error(refused, 400, "payment_intent_unexpected_state", None)
        assert "status of canceled" in refused.error["message"]


async def test_cancellation_reason_must_be_stripes(api: Client) -> None:
    intent = expect(await api.create(amount=1000, currency="usd"))
    for reason in ("automatic", "bored", "DUPLICATE"):
        refused = await api.post(f"/v1/payment_intents/{intent['id']}/cancel",
                                 {"cancellation_reason": reason})
        assert_error(refused, 400, "parameter_invalid", "cancellation_reason")
        assert refused.error["message"] == (
            "Invalid cancellation_reason: must be one of abandoned, duplicate, fraudulent, or "
            "requested_by_customer")
    unknown = await api.post(f"/v1/payment_intents/{intent['id']}/cancel", {"reason": "x"})
    assert_error(unknown, 400, "parameter_unknown", "reason")
    missing = await api.post("/v1/payment_intents/pi_000000000000000000000000/cancel")
    assert_error(missing, 404, "resource_missing", "intent")


async def test_the_processor_refuses_what_the_edge_would_have(migrated: None) -> None:
    """Commands sent past the edge (as an edge with a stale view would send them): the
    processor refuses them by the same table, in the inbox with Stripe's error, and nothing
    changes, at the PSP either."""
    async with stack(make_settings(partitions=1)) as s, broker(s.settings) as channel:
        api = await s.client()
        intent = await authorized(api, 1000)
        expect(await api.post(f"/v1/payment_intents/{intent['id']}/capture"))
        await settled(api, intent["id"], "succeeded")
        common = {"account_id": api.account_id, "intent_id": intent["id"],
                  "request_id": "req_forged", "accepted_at": int(time.time()),
                  "fingerprint": "0" * 64}
        forged = [CancelIntent(**common, idempotency_key=str(uuid.uuid4())),
                  CaptureIntent(**common, idempotency_key=str(uuid.uuid4())),
                  UpdateIntent(**common, idempotency_key=str(uuid.uuid4()),
                               changes={"amount": 5000})]
        for command in forged:
            await publish_raw(channel, s.settings, command.encode(), command.message_id)
        keys = [c.idempotency_key for c in forged]
        deadline = time.monotonic() + 20
        while len(rows := await s.db.fetch(
                "SELECT idempotency_key, outcome, error FROM inbox WHERE account_id = $1 AND "
                "idempotency_key = ANY($2)", api.account_id, keys)) < 3:
            assert time.monotonic() < deadline, rows
            await asyncio.sleep(0.05)
        errors = {r["idempotency_key"]: r["error"] for r in rows if r["outcome"] == "rejected"}
        assert set(errors) == set(keys)
        assert errors[keys[0]]["message"].startswith(
            "You cannot cancel this PaymentIntent because it has a status of succeeded.")
        assert errors[keys[1]]["code"] == "payment_intent_unexpected_state"
        assert errors[keys[2]]["param"] == "amount"
        done = await settled(api, intent["id"], "succeeded")
        assert (done["amount"], done["amount_received"]) == (1000, 1000)
        [book] = await books(api, intent["id"])
        assert list(book["kinds"]) == ["capture"]


async def test_update_before_confirmation(api: Client) -> None:
    intent = expect(await api.create(amount=1000, currency="usd",
                                     metadata={"a": "1", "b": "2", "c": "3"}))
    path = f"/v1/payment_intents/{intent['id']}"
    updated = expect(await api.post(path, form({
        "amount": 2500, "currency": "EUR", "description": "a hat", "customer": "cus_9",
        "metadata": {"b": "", "c": "33", "d": "4"}})))
    assert (updated["amount"], updated["currency"], updated["description"],
            updated["customer"], updated["status"]) == \
        (2500, "eur", "a hat", "cus_9", "requires_payment_method")
    assert updated["metadata"] == {"a": "1", "c": "33", "d": "4"}
    attached = expect(await api.post(path, {"payment_method": VISA,
                                            "capture_method": "manual"}))
    assert (attached["status"], attached["payment_method"], attached["capture_method"]) == \
        ("requires_confirmation", VISA, "manual")
    cleared = expect(await api.post(path, {"metadata": "", "description": ""}))
    assert (cleared["metadata"], cleared["description"]) == ({}, None)
    applied = await settled(api, intent["id"], "requires_confirmation")
    assert {k: applied[k] for k in ("amount", "currency", "customer", "description",
                                    "metadata", "payment_method", "capture_method")} == {
        "amount": 2500, "currency": "eur", "customer": "cus_9", "description": None,
        "metadata": {}, "payment_method": VISA, "capture_method": "manual"}
    # Stripe sends no event for an update.
    assert await event_types(api, intent["id"]) == ["payment_intent.created"]

    expect(await api.post(f"{path}/confirm"))
    held = await settled(api, intent["id"], "requires_capture")
    assert held["amount_capturable"] == 2500


async def test_update_after_confirmation(api: Client) -> None:
    paid = expect(await api.create(amount=1000, currency="usd", payment_method=VISA,
                                   confirm=True, metadata={"k": "v"}))
    path = f"/v1/payment_intents/{paid['id']}"
    await settled(api, paid["id"], "succeeded")
    for name, value in (("amount", "2000"), ("currency", "eur"), ("payment_method", VISA),
                        ("capture_method", "manual"), ("customer", "cus_1")):
        refused = await api.post(path, {name: value})
        assert_error(refused, 400, "payment_intent_unexpected_state", name)
        assert refused.error["message"] == (
            f"This PaymentIntent's {name} could not be updated because it has a status of "
            f"succeeded. You may only update the {name} of a PaymentIntent with one of the "
            "following statuses: requires_payment_method, requires_confirmation, "
            "requires_action.")
    annotated = expect(await api.post(path, form({"metadata": {"k": "", "shipped": "yes"},
                                                  "description": "sent"})))
    assert (annotated["metadata"], annotated["status"]) == ({"shipped": "yes"}, "succeeded")
    done = await settled(api, paid["id"], "succeeded")
    assert (done["metadata"], done["description"], done["amount_received"]) == \
        ({"shipped": "yes"}, "sent", 1000)


async def test_update_refusals(api: Client) -> None:
    intent = expect(await api.create(amount=1000, currency="usd"))
    path = f"/v1/payment_intents/{intent['id']}"
    assert_error(await api.post(path, {"amount": "10"}), 400, "amount_too_small", "amount")
    # The amount stands; a currency whose minimum it is under is refused.
    assert_error(await api.post(path, {"currency": "jpy", "amount": "1"}), 400,
                 "amount_too_small", "amount")
    assert_error(await api.post(path, {"amount": ""}), 400, "parameter_invalid", "amount")
    # JSON's null is an empty value too: what an intent always has cannot be removed.
    for name in ("amount", "currency", "payment_method", "capture_method"):
        assert_error(await api.post(path, json={name: None, "currency": "pln"}
                                    if name == "amount" else {name: None}),
                     400, "parameter_invalid", name)
    assert (await api.get(path)).body["amount"] == 1000
    assert_error(await api.post(path, {"capture_method": "later"}), 400, "parameter_invalid",
                 "capture_method")
    assert_error(await api.post(path, {"confirm": "true"}), 400, "parameter_unknown",
                 "confirm")
    many = {"metadata": {f"k{i}": "v" for i in range(30)}}
    expect(await api.post(path, form(many)))
    more = {"metadata": {f"j{i}": "v" for i in range(21)}}
    assert_error(await api.post(path, form(more)), 400, "parameter_invalid", "metadata")


async def test_confirm_with_manual_capture(api: Client) -> None:
    intent = expect(await api.create(amount=1200, currency="usd", payment_method=VISA))
    assert intent["capture_method"] == "automatic"
    confirming = expect(await api.post(f"/v1/payment_intents/{intent['id']}/confirm",
                                       {"capture_method": "manual"}))
    assert (confirming["status"], confirming["capture_method"]) == ("processing", "manual")
    held = await settled(api, intent["id"], "requires_capture")
    assert (held["amount_capturable"], held["capture_method"]) == (1200, "manual")


async def test_automatic_async_behaves_as_automatic(api: Client) -> None:
    paid = expect(await api.create(amount=900, currency="usd", payment_method=VISA,
                                   confirm=True, capture_method="automatic_async"))
    done = await settled(api, paid["id"], "succeeded")
    assert (done["capture_method"], done["amount_received"]) == ("automatic_async", 900)


async def test_an_uncaptured_authorization_expires(migrated: None) -> None:
    async with stack(make_settings(capture_window_s=1.0)) as s:
        api = await s.client()
        intent = await authorized(api, 1800)
        done = await settled(api, intent["id"], "canceled")
        assert (done["cancellation_reason"], done["amount_capturable"]) == ("automatic", 0)
        [book] = await books(api, intent["id"])
        assert (list(book["kinds"]), book["voided"]) == (["void"], 1800)
        charge = await charge_of(api, intent["id"])
        assert (charge["refunded"], charge["amount_refunded"]) == (True, 1800)
        # Once: the sweeper's copies of the expiry find the intent canceled.
        assert (await event_types(api, intent["id"])).count("payment_intent.canceled") == 1
        refused = await api.post(f"/v1/payment_intents/{intent['id']}/capture")
        assert "status of canceled" in refused.error["message"]


def test_a_request_without_capture_method_fingerprints_as_before_it_existed() -> None:
    """A retry across the upgrade that added capture_method is the same request: its
    canonical values, which the fingerprint is computed over, are as they were."""
    assert params.create_intent({"amount": "1000", "currency": "usd"}) == {
        "amount": 1000, "currency": "usd", "customer": None, "description": None,
        "metadata": {}, "payment_method": None, "confirm": False}
    assert params.confirm_intent({}) == {"payment_method": None}
    manual = params.create_intent({"amount": "1000", "currency": "usd",
                                   "capture_method": "manual"})
    assert manual["capture_method"] == "manual"
