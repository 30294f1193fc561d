"""The shared definitions, without services: transitions, commands, ids, parameters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from contracts import currencies, ids, objects
from contracts.commands import CommandDecodeError, ConfirmIntent, CreateIntent, decode
from contracts.enums import IntentStatus as S
from contracts.errors import InvalidRequest, PayonceError, ResourceMissing, UnexpectedState
from contracts.transitions import TERMINAL, TRANSITIONS, Action, next_status
from edge import params
from tests import stripe_schema

DECLINED = "pm_card_visa_chargeDeclinedInsufficientFunds"


def test_confirm_only_before_processing() -> None:
    assert next_status(Action.CONFIRM, S.REQUIRES_CONFIRMATION) is S.PROCESSING
    assert next_status(Action.CONFIRM, S.REQUIRES_PAYMENT_METHOD) is S.PROCESSING
    for status in (S.PROCESSING, S.SUCCEEDED, S.CANCELED, S.REQUIRES_CAPTURE):
        with pytest.raises(UnexpectedState) as raised:
            next_status(Action.CONFIRM, status)
        assert raised.value.body()["error"]["code"] == "payment_intent_unexpected_state"
        assert status.value in raised.value.message


def test_error_bodies_leave_out_what_is_absent() -> None:
    """Stripe's schema types code, param and decline_code as strings: absent, never null."""
    assert PayonceError("boom").body() == {"error": {"type": "api_error", "message": "boom"}}
    assert ResourceMissing("gone", param="intent").body() == {"error": {
        "type": "invalid_request_error", "code": "resource_missing", "message": "gone",
        "param": "intent"}}
    declined = PayonceError("no", code="card_declined", decline_code="lost_card").body()
    assert declined["error"]["decline_code"] == "lost_card" and "param" not in declined["error"]


def test_terminal_states_have_no_way_out() -> None:
    for table in TRANSITIONS.values():
        # A late PSP result, or new metadata, leaves a terminal intent where it is.
        assert all(table[status] == status for status in TERMINAL & set(table))


def test_psp_results_apply_while_processing_and_leave_a_canceled_intent_canceled() -> None:
    assert next_status(Action.PSP_SUCCEEDED, S.PROCESSING) is S.SUCCEEDED
    assert next_status(Action.PSP_AUTHORIZED, S.PROCESSING) is S.REQUIRES_CAPTURE
    assert next_status(Action.PSP_DECLINED, S.PROCESSING) is S.REQUIRES_PAYMENT_METHOD
    for action in (Action.PSP_SUCCEEDED, Action.PSP_AUTHORIZED, Action.PSP_DECLINED):
        assert next_status(action, S.CANCELED) is S.CANCELED
        for status in (S.SUCCEEDED, S.REQUIRES_CAPTURE, S.REQUIRES_CONFIRMATION):
            with pytest.raises(UnexpectedState):
                next_status(action, status)


def test_commands_round_trip() -> None:
    create = CreateIntent(account_id="acct_1", intent_id="pi_1", request_id="req_1",
                          accepted_at=1, idempotency_key="k", fingerprint="f" * 64, amount=5,
                          currency="usd", metadata={"a": "b"}, confirm=True,
                          payment_method="pm_card_visa")
    confirm = ConfirmIntent(account_id="acct_1", intent_id="pi_1", request_id="req_2",
                            accepted_at=2, idempotency_key="k2", fingerprint="e" * 64)
    assert decode(create.encode()) == create
    assert decode(confirm.encode()) == confirm
    assert create.message_id != confirm.message_id


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"type": "nope"}', b'{"type": "payment_intent.confirm"}',
    b'{"type": "payment_intent.create", "account_id": "a", "intent_id": "p", "request_id": "r",'
    b' "accepted_at": 1, "idempotency_key": "k", "fingerprint": "f", "amount": "5",'
    b' "currency": "usd"}',
    b'{"type": "payment_intent.confirm", "account_id": "a", "intent_id": "p", "request_id": "r",'
    b' "accepted_at": 1, "idempotency_key": "k", "fingerprint": "f", "extra": 1}',
])
def test_malformed_commands_are_named_errors(body: bytes) -> None:
    with pytest.raises(CommandDecodeError):
        decode(body)


def test_ids_derive_from_account_and_key() -> None:
    secret = b"s"
    first = ids.intent_id(secret, "acct_a", "key-1")
    assert first == ids.intent_id(secret, "acct_a", "key-1")
    assert first != ids.intent_id(secret, "acct_b", "key-1")
    assert first != ids.intent_id(secret, "acct_a", "key-2")
    assert first != ids.intent_id(b"other", "acct_a", "key-1")
    assert first.startswith("pi_") and len(first) == 27
    client_secret = ids.client_secret(secret, first)
    assert ids.client_secret_matches(secret, client_secret)
    assert not ids.client_secret_matches(b"other", client_secret)
    assert not ids.client_secret_matches(secret, "garbage")


def test_form_and_json_give_the_same_canonical_parameters() -> None:
    form = params.create_intent(params.parse_form(
        "amount=100&currency=USD&metadata[order]=42&confirm=true&payment_method=pm_card_visa"))
    body = params.create_intent(params.parse_json(
        b'{"amount": 100, "currency": "usd", "metadata": {"order": "42"}, "confirm": true,'
        b' "payment_method": "pm_card_visa"}'))
    assert form == body


def test_form_nesting_makes_hashes() -> None:
    parsed = params.parse_form("a[b][c]=1&x[0]=p&x[1]=q&e=")
    assert parsed == {"a": {"b": {"c": "1"}}, "x": {"0": "p", "1": "q"}, "e": ""}
    with pytest.raises(InvalidRequest):
        params.parse_form("a=1&a=2")
    with pytest.raises(InvalidRequest):
        params.parse_form("a[b=1")


def test_numeric_metadata_keys_are_the_same_in_form_and_json() -> None:
    form = params.create_intent(params.parse_form("amount=100&currency=usd&metadata[1]=x"))
    body = params.create_intent(params.parse_json(
        b'{"amount": 100, "currency": "usd", "metadata": {"1": "x"}}'))
    assert form == body and form["metadata"] == {"1": "x"}


def test_lists_from_json_or_indexed_form_keys() -> None:
    expand = params.list_of(params.string(20), max_items=3)
    assert expand(params.parse_form("x[1]=q&x[0]=p")["x"], "x") == ["p", "q"]
    assert expand(["p", "q"], "x") == ["p", "q"]
    for bad in ({"1": "q"}, {"0": "p", "2": "q"}, {"0": "p", "a": "q"}, {"00": "p"}, "p",
                ["a", "b", "c", "d"]):
        with pytest.raises(InvalidRequest) as raised:
            expand(bad, "x")
        assert raised.value.param == "x"
    with pytest.raises(InvalidRequest) as raised:
        expand({"0": "p", "1": 5}, "x")
    assert raised.value.param == "x[1]"


def test_every_currency_has_a_minimum_it_can_be_charged_in() -> None:
    assert currencies.MINIMUMS.keys() == currencies.CURRENCIES
    assert set(currencies.STRIPE_MINIMUMS).isdisjoint(currencies.USD_RATES)
    assert set(currencies.STRIPE_MINIMUMS) | set(currencies.USD_RATES) == currencies.CURRENCIES
    assert currencies.ZERO_DECIMAL | currencies.THREE_DECIMAL <= currencies.CURRENCIES
    for code, minimum in currencies.MINIMUMS.items():
        assert 1 <= minimum <= params.MAX_AMOUNT, code
        assert minimum % currencies.step(code) == 0, code
        params.charge_amount(minimum, code, "amount")
        with pytest.raises(InvalidRequest) as raised:
            params.charge_amount(minimum - 1, code, "amount")
        assert raised.value.code in ("amount_too_small", "invalid_charge_amount",
                                     "invalid_charge_amount_no_decimal_compatible"), code
    for code, rate in currencies.USD_RATES.items():
        # The derived minimums are 0.50 USD, rounded up by at most a few cents.
        in_usd = currencies.MINIMUMS[code] / 10 ** currencies.exponent(code) / float(rate)
        assert 0.50 <= in_usd < 0.56, (code, in_usd)


def test_amounts_follow_the_currency() -> None:
    assert currencies.MINIMUMS["usd"] == 50 and currencies.MINIMUMS["jpy"] == 50
    assert currencies.display(50, "usd") == "0.50 usd"
    assert currencies.display(50, "jpy") == "50 jpy"
    assert currencies.display(190, "bhd") == "0.190 bhd"
    assert currencies.display(1234567, "eur") == "12,345.67 eur"
    with pytest.raises(InvalidRequest) as raised:
        params.create_intent({"amount": "49", "currency": "USD"})
    error = raised.value.body()["error"]
    assert (error["code"], error["param"]) == ("amount_too_small", "amount")
    assert "0.50 usd" in error["message"]
    assert params.create_intent({"amount": "5120", "currency": "kwd"})["amount"] == 5120
    with pytest.raises(InvalidRequest) as raised:
        params.create_intent({"amount": "5125", "currency": "kwd"})
    assert raised.value.code == "invalid_charge_amount" and "5120 or 5130" in raised.value.message
    with pytest.raises(InvalidRequest) as raised:
        params.create_intent({"amount": "10050", "currency": "isk"})
    assert raised.value.code == "invalid_charge_amount_no_decimal_compatible"
    for unsupported in ("irr", "stn", "xau", "USD "):
        with pytest.raises(InvalidRequest) as raised:
            params.create_intent({"amount": "1000", "currency": unsupported})
        assert raised.value.param == "currency"


# ---- objects against Stripe's published schemas -----------------------------------------

NOW = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
INTENT_ROW = {
    "id": "pi_" + "A" * 24, "amount": 2000, "amount_received": 0, "currency": "usd",
    "status": "requires_payment_method", "capture_method": "automatic", "customer": "cus_1",
    "description": "two tickets", "metadata": {"order": "42"}, "payment_method": None,
    "last_payment_error": None, "latest_charge": None, "created": NOW, "updated_at": NOW,
}


def charge_row(payment_method: str, *, declined: str | None = None) -> dict[str, Any]:
    failed = declined is not None
    return {
        "id": "ch_" + "B" * 24, "payment_intent_id": INTENT_ROW["id"], "amount": 2000,
        "amount_captured": 0 if failed else 2000, "currency": "usd",
        "status": "failed" if failed else "succeeded", "payment_method": payment_method,
        "authorization_code": None if failed else "123456",
        "failure_code": "card_declined" if failed else None,
        "failure_message": "Your card has insufficient funds." if failed else None,
        "decline_code": declined, "created": NOW,
    }


def test_intents_are_stripe_payment_intents_in_every_state() -> None:
    projected = objects.payment_intent(
        {**params.create_intent({"amount": "2000", "currency": "usd"}), "id": INTENT_ROW["id"],
         "status": "requires_payment_method", "created": 1_700_000_000}, b"s")
    declined_charge = charge_row(DECLINED, declined="insufficient_funds")
    rows = [
        INTENT_ROW,
        {**INTENT_ROW, "status": "processing", "payment_method": "pm_card_visa"},
        {**INTENT_ROW, "status": "succeeded", "payment_method": "pm_card_visa",
         "amount_received": 2000, "latest_charge": "ch_" + "B" * 24},
        {**INTENT_ROW, "payment_method": DECLINED, "latest_charge": declined_charge["id"],
         "last_payment_error": objects.payment_error(declined_charge)},
    ]
    for intent in [projected, *(objects.payment_intent(r, b"s") for r in rows)]:
        stripe_schema.check("payment_intent", intent)
        assert set(intent) == stripe_schema.fixture_fields("payment_intent")


def test_a_declined_payment_leaves_a_stripe_error_with_its_payment_method() -> None:
    row = charge_row(DECLINED, declined="insufficient_funds")
    error = objects.payment_error(row)
    stripe_schema.check("error", {"error": error})
    assert None not in error.values()
    assert (error["type"], error["code"], error["decline_code"], error["charge"]) == (
        "card_error", "card_declined", "insufficient_funds", row["id"])
    method = error["payment_method"]
    stripe_schema.check("payment_method", method)
    assert (method["id"], method["object"], method["type"]) == (DECLINED, "payment_method",
                                                                "card")
    assert (method["card"]["brand"], method["card"]["last4"]) == ("visa", "9995")
    assert method["created"] == int(NOW.timestamp()) and method["card"]["exp_year"] == 2026
    assert "decline_code" not in objects.payment_error({**row, "decline_code": None})


def test_errors_stored_with_a_payment_method_stub_render_in_full() -> None:
    stub = {**objects.payment_error(charge_row(DECLINED, declined="generic_decline")),
            "payment_method": {"id": DECLINED, "object": "payment_method"}}
    intent = objects.payment_intent({**INTENT_ROW, "last_payment_error": stub}, b"s")
    stripe_schema.check("payment_intent", intent)
    method = intent["last_payment_error"]["payment_method"]
    assert (method["card"]["last4"], method["created"]) == ("9995", int(NOW.timestamp()))


@pytest.mark.parametrize(("payment_method", "brand", "last4"), [
    ("pm_card_visa", "visa", "4242"), ("pm_card_mastercard", "mastercard", "4444"),
    ("pm_card_amex", "amex", "8431"), ("pm_card_chargeDeclinedExpiredCard", "visa", "0069"),
    ("pm_anything_else", "visa", "4242"),
])
def test_charges_are_stripe_charges_with_their_card(payment_method: str, brand: str,
                                                   last4: str) -> None:
    for row in (charge_row(payment_method), charge_row(payment_method, declined="lost_card")):
        rendered = objects.charge(row)
        stripe_schema.check("charge", rendered)
        # authorization_code is payonce's own addition, documented in the README.
        assert set(rendered) == stripe_schema.fixture_fields("charge") | {"authorization_code"}
        details = rendered["payment_method_details"]
        assert details["type"] == "card"
        assert (details["card"]["brand"], details["card"]["last4"]) == (brand, last4)
        assert rendered["billing_details"]["address"]["country"] is None
        assert rendered["disputed"] is False


def test_charge_outcomes() -> None:
    paid = objects.charge(charge_row("pm_card_visa"))
    assert (paid["paid"], paid["captured"], paid["outcome"]["type"]) == (True, True,
                                                                         "authorized")
    declined = objects.charge(charge_row(DECLINED, declined="generic_decline"))
    assert (declined["paid"], declined["captured"]) == (False, False)
    assert (declined["outcome"]["type"], declined["outcome"]["reason"]) == (
        "issuer_declined", "generic_decline")
    assert declined["failure_code"] == "card_declined"


@pytest.mark.parametrize("error", [
    PayonceError("boom"), InvalidRequest("bad"), UnexpectedState("no", param="payment_method"),
    ResourceMissing("gone", param="intent"),
    PayonceError("declined", code="card_declined", decline_code="lost_card"),
], ids=["api_error", "invalid_request", "unexpected_state", "resource_missing", "declined"])
def test_every_error_body_is_a_stripe_error(error: PayonceError) -> None:
    stripe_schema.check("error", error.body())


def test_openapi_nullable_required_and_additional_properties_are_honoured() -> None:
    """The translation from OpenAPI 3.0 keeps what Stripe published: null only where
    `nullable` says so (enums included), required fields, and typed maps; extra fields on
    objects are allowed, as published."""
    intent = objects.payment_intent(INTENT_ROW, b"s")
    assert not stripe_schema.errors("payment_intent", {**intent, "description": None,
                                                       "cancellation_reason": None})
    assert stripe_schema.errors("payment_intent", {**intent, "status": None})
    assert stripe_schema.errors("payment_intent", {**intent, "cancellation_reason": "bored"})
    assert stripe_schema.errors("payment_intent", {**intent, "metadata": {"a": 1}})
    assert stripe_schema.errors("payment_intent", {**intent, "last_payment_error": {
        "type": "card_error", "code": None}})
    assert not stripe_schema.errors("payment_intent", {**intent, "payonce_extra": 1})
    del intent["capture_method"]
    assert stripe_schema.errors("payment_intent", intent) == [
        "(top): 'capture_method' is a required property"]
    charge = objects.charge(charge_row("pm_card_visa"))
    assert stripe_schema.errors("charge", {**charge, "disputed": None})
    assert stripe_schema.errors("charge", {**charge, "billing_details": {"address": 5}})
    assert stripe_schema.errors("error", {"error": {"type": "invalid_request_error",
                                                    "param": None}})
