"""The shared definitions, without services: transitions, commands, ids, parameters."""

from __future__ import annotations

import pytest

from contracts import currencies, ids
from contracts.commands import CommandDecodeError, ConfirmIntent, CreateIntent, decode
from contracts.enums import IntentStatus as S
from contracts.errors import InvalidRequest, PayonceError, ResourceMissing, UnexpectedState
from contracts.transitions import TERMINAL, TRANSITIONS, Action, next_status
from edge import params


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
        assert not TERMINAL & set(table)


def test_psp_results_only_apply_while_processing() -> None:
    assert next_status(Action.PSP_SUCCEEDED, S.PROCESSING) is S.SUCCEEDED
    assert next_status(Action.PSP_DECLINED, S.PROCESSING) is S.REQUIRES_PAYMENT_METHOD
    with pytest.raises(UnexpectedState):
        next_status(Action.PSP_SUCCEEDED, S.CANCELED)


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
