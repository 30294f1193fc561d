"""API objects as clients see them, rendered from database rows (or from a command, for the
202 answered before the command is applied). One renderer per object, used by the edge for
responses and by the processor for event payloads, so both always agree.

Each object carries every field Stripe returns for it. Where payonce has nothing to say (no
Connect, no Radar, no receipts, no shipping) the field is null, as Stripe's schema allows, or
the empty value Stripe itself sends (`fraud_details: {}`); nothing is made up. The card
behind a payment method is known only for Stripe's test cards, named by their ids; any other
`pm_…` is rendered as the default test card, a visa ending 4242.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from contracts import ids

API_VERSION = "2024-06-20"

# Stripe's test payment methods: the card's brand and the last four digits of its number
# (stripe.com/docs/testing).
TEST_CARDS: dict[str, tuple[str, str]] = {
    "pm_card_visa": ("visa", "4242"),
    "pm_card_mastercard": ("mastercard", "4444"),
    "pm_card_amex": ("amex", "8431"),
    "pm_card_visa_chargeDeclined": ("visa", "0002"),
    "pm_card_visa_chargeDeclinedInsufficientFunds": ("visa", "9995"),
    "pm_card_visa_chargeDeclinedLostCard": ("visa", "9987"),
    "pm_card_visa_chargeDeclinedStolenCard": ("visa", "9979"),
    "pm_card_chargeDeclinedExpiredCard": ("visa", "0069"),
    "pm_card_chargeDeclinedIncorrectCvc": ("visa", "0127"),
    "pm_card_chargeDeclinedProcessingError": ("visa", "0119"),
    "pm_card_visa_chargeDeclinedVelocityLimitExceeded": ("visa", "6975"),
    "pm_card_refundFail": ("visa", "5126"),
}
DEFAULT_CARD = TEST_CARDS["pm_card_visa"]
# Stablecoin payment methods on a test network: (network, token). Their charge's
# authorization code is the PSP's settlement reference, `<transaction hash>:<confirmations>`
# (processor/psp.py).
CRYPTO_METHODS: dict[str, tuple[str, str]] = {
    "pm_crypto_usdc": ("ethereum", "usdc"),
}

# The seller messages Stripe puts in a charge's outcome.
_APPROVED = "Payment complete."
_GENERIC_DECLINE = "The bank did not return any further details with this decline."


def unix(value: datetime | int) -> int:
    return value if isinstance(value, int) else int(value.timestamp())


def _maybe_unix(value: datetime | int | None) -> int | None:
    return None if value is None else unix(value)


def _card(payment_method_id: str, created: int) -> dict[str, Any]:
    """What every rendering of a card shares. Stripe's test cards are US credit cards; their
    expiry is any date to come, here the December after the card was first used."""
    brand, last4 = TEST_CARDS.get(payment_method_id, DEFAULT_CARD)
    return {
        "brand": brand,
        "checks": {"address_line1_check": None, "address_postal_code_check": None,
                   "cvc_check": None},
        "country": "US",
        "exp_month": 12,
        "exp_year": datetime.fromtimestamp(created, UTC).year + 1,
        "fingerprint": None,
        "funding": "credit",
        "last4": last4,
        "wallet": None,
    }


def billing_details() -> dict[str, Any]:
    """No billing details are collected: every field present, every one null."""
    address = dict.fromkeys(("city", "country", "line1", "line2", "postal_code", "state"))
    return {"address": address, "email": None, "name": None, "phone": None}


def payment_method(payment_method_id: str, created: int) -> dict[str, Any]:
    """The PaymentMethod object, as `last_payment_error.payment_method` carries it. `created`
    is when it was first used: a test card's PaymentMethod comes into being with its charge."""
    card = _card(payment_method_id, created)
    return {
        "id": payment_method_id,
        "object": "payment_method",
        "billing_details": billing_details(),
        "card": {
            **card,
            "generated_from": None,
            "networks": {"available": [card["brand"]], "preferred": None},
            "three_d_secure_usage": {"supported": True},
        },
        "created": created,
        "customer": None,
        "livemode": False,
        "metadata": {},
        "type": "card",
    }


def _last_payment_error(row: Mapping[str, Any]) -> dict[str, Any] | None:
    error = row.get("last_payment_error")
    if error is None:
        return None
    method = error.get("payment_method")
    if isinstance(method, dict) and "type" not in method:
        # Errors stored before payment methods were rendered in full hold an {id, object}
        # stub; the intent's last update is when that payment failed.
        when = unix(row.get("updated_at") or row["created"])
        error = {**error, "payment_method": payment_method(method["id"], when)}
    return dict(error)


def payment_intent(row: Mapping[str, Any], secret: bytes) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "payment_intent",
        "amount": row["amount"],
        "amount_capturable": row.get("amount_capturable") or 0,
        "amount_details": {"tip": {}},
        "amount_received": row.get("amount_received") or 0,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": None,
        "canceled_at": _maybe_unix(row.get("canceled_at")),
        "cancellation_reason": row.get("cancellation_reason"),
        "capture_method": row.get("capture_method") or "automatic",
        "client_secret": ids.client_secret(secret, row["id"]),
        "confirmation_method": "automatic",
        "created": unix(row["created"]),
        "currency": row["currency"],
        "customer": row.get("customer"),
        "customer_account": None,
        "description": row.get("description"),
        "excluded_payment_method_types": None,
        "last_payment_error": _last_payment_error(row),
        "latest_charge": row.get("latest_charge"),
        "livemode": False,
        "managed_payments": None,
        "metadata": dict(row.get("metadata") or {}),
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": row.get("payment_method"),
        "payment_method_configuration_details": None,
        "payment_method_options": None,
        "payment_method_types": ["card"],
        "processing": None,
        "receipt_email": None,
        "review": None,
        "setup_future_usage": None,
        "shipping": None,
        "source": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": row["status"],
        "transfer_data": None,
        "transfer_group": None,
    }


def _outcome(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """Radar does not run here, hence `risk_level: not_assessed`."""
    if row["status"] == "succeeded":
        return {"network_status": "approved_by_network", "reason": None,
                "risk_level": "not_assessed", "seller_message": _APPROVED, "type": "authorized"}
    if row["status"] == "failed":
        decline = row.get("decline_code")
        message = (_GENERIC_DECLINE if decline in (None, "generic_decline")
                   else f"The bank returned the decline code `{decline}`.")
        return {"network_status": "declined_by_network", "reason": decline,
                "risk_level": "not_assessed", "seller_message": message,
                "type": "issuer_declined"}
    return None


def crypto_reference(transaction_hash: str, confirmations: int) -> str:
    """The settlement reference the PSP answers for an on-chain payment, in place of a card
    authorization code."""
    return f"{transaction_hash}:{confirmations}"


def _crypto_details(row: Mapping[str, Any]) -> dict[str, Any]:
    """`payment_method_details` of a stablecoin charge, after Stripe's `crypto` details
    (network, token, transaction hash); `confirmations`, the block confirmations the PSP
    waited for, and `test_network` are payonce's own."""
    network, token = CRYPTO_METHODS[row["payment_method"]]
    transaction_hash, confirmations = None, 0
    reference = row.get("authorization_code")
    if reference:
        transaction_hash, _, depth = reference.partition(":")
        confirmations = int(depth or 0)
    return {
        "type": "crypto",
        "crypto": {"buyer_address": None, "confirmations": confirmations, "network": network,
                   "test_network": "sepolia", "token_currency": token,
                   "transaction_hash": transaction_hash},
    }


def _payment_method_details(row: Mapping[str, Any], created: int) -> dict[str, Any]:
    if row["payment_method"] in CRYPTO_METHODS:
        return _crypto_details(row)
    card = _card(row["payment_method"], created)
    return {
        "type": "card",
        "card": {
            **card,
            "installments": None,
            "mandate": None,
            "network": card["brand"],
            "network_token": {"used": False},
            "three_d_secure": None,
        },
    }


def charge(row: Mapping[str, Any]) -> dict[str, Any]:
    """A charge. `authorization_code` (the PSP's approval code, top level) is payonce's own;
    its customer and description are its intent's when it was made, as Stripe copies them.
    What an authorization gave back uncaptured (released by a cancel or a partial capture, or
    reversed) counts as refunded, as at Stripe, and so do refunds pending and succeeded; a
    failed refund gives its amount back."""
    created = unix(row["created"])
    refunded = (row.get("amount_released") or 0) + (row.get("amount_refunded") or 0)
    crypto = row["payment_method"] in CRYPTO_METHODS
    return {
        "id": row["id"],
        "object": "charge",
        "amount": row["amount"],
        "amount_captured": row["amount_captured"],
        "amount_refunded": refunded,
        "application": None,
        "application_fee": None,
        "application_fee_amount": None,
        "authorization_code": None if crypto else row.get("authorization_code"),
        "balance_transaction": None,
        "billing_details": billing_details(),
        "calculated_statement_descriptor": None,
        "captured": row["amount_captured"] > 0,
        "created": created,
        "currency": row["currency"],
        "customer": row.get("customer"),
        "description": row.get("description"),
        "disputed": False,
        "failure_balance_transaction": None,
        "failure_code": row.get("failure_code"),
        "failure_message": row.get("failure_message"),
        "fraud_details": {},
        "livemode": False,
        "metadata": {},
        "on_behalf_of": None,
        "outcome": _outcome(row),
        "paid": row["status"] == "succeeded",
        "payment_intent": row["payment_intent_id"],
        "payment_method": row["payment_method"],
        "payment_method_details": _payment_method_details(row, created),
        "receipt_email": None,
        "receipt_number": None,
        "receipt_url": None,
        "refunded": refunded == row["amount"],
        "refunds": None,
        "review": None,
        "shipping": None,
        "source": None,
        "source_transfer": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": row["status"],
        "transfer_data": None,
        "transfer_group": None,
    }


def refund(row: Mapping[str, Any]) -> dict[str, Any]:
    """A refund (Stripe's Refund). `failure_reason` only once it failed, as Stripe sends it;
    payonce keeps no balance transactions."""
    failure = row.get("failure_reason")
    return {
        "id": row["id"],
        "object": "refund",
        "amount": row["amount"],
        "balance_transaction": None,
        "charge": row["charge_id"],
        "created": unix(row["created"]),
        "currency": row["currency"],
        "destination_details": None,
        **({"failure_reason": failure} if failure else {}),
        "metadata": dict(row.get("metadata") or {}),
        "payment_intent": row["payment_intent_id"],
        "reason": row.get("reason"),
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": row["status"],
        "transfer_reversal": None,
    }


def payment_error(row: Mapping[str, Any]) -> dict[str, Any]:
    """The `last_payment_error` a failed charge leaves on its intent; keys without a value are
    left out, as in every Stripe error."""
    error = {
        "type": "card_error",
        "charge": row["id"],
        "code": row["failure_code"],
        "decline_code": row.get("decline_code"),
        "message": row["failure_message"],
        "payment_method": payment_method(row["payment_method"], unix(row["created"])),
        "payment_method_type": "card",
    }
    return {k: v for k, v in error.items() if v is not None}


def event(row: Mapping[str, Any], *, pending_webhooks: int = 0) -> dict[str, Any]:
    """An event row as Stripe's Event; `pending_webhooks` counts its deliveries not finished."""
    return {
        "id": row["id"],
        "object": "event",
        "account": row["account_id"],
        "api_version": API_VERSION,
        "created": unix(row["created"]),
        "data": {
            "object": row["data"],
            **({"previous_attributes": row["previous_attributes"]}
               if row.get("previous_attributes") else {}),
        },
        "livemode": False,
        "pending_webhooks": pending_webhooks,
        "request": {"id": row.get("request_id"), "idempotency_key": row.get("idempotency_key")},
        "type": row["type"],
    }


def webhook_endpoint(row: Mapping[str, Any], *, secret: str | None = None) -> dict[str, Any]:
    """Stripe's WebhookEndpoint; `secret` only in the answer to its creation, as Stripe does."""
    return {
        "id": row["id"],
        "object": "webhook_endpoint",
        "api_version": API_VERSION,
        "application": None,
        "created": unix(row["created"]),
        "description": row.get("description"),
        "enabled_events": list(row["enabled_events"]),
        "livemode": False,
        "metadata": dict(row.get("metadata") or {}),
        **({"secret": secret} if secret is not None else {}),
        "status": row["status"],
        "url": row["url"],
    }


def deleted(object_name: str, object_id: str) -> dict[str, Any]:
    """What Stripe answers to a DELETE."""
    return {"id": object_id, "object": object_name, "deleted": True}


def webhook_delivery_attempt(row: Mapping[str, Any]) -> dict[str, Any]:
    """One attempt to deliver an event to a webhook endpoint: a webhook_attempts row joined
    with its delivery. payonce's own object (Stripe shows attempts in its Dashboard only); its
    id is the delivery's and the attempt's number. `state` is the delivery's now: pending (the
    next attempt is due at the latest attempt's `next_attempt_at`), succeeded or failed."""
    next_attempt_at = row.get("next_attempt_at")
    return {
        "id": f"{row['delivery_id']}_{row['attempt']}",
        "object": "webhook_delivery_attempt",
        "attempt": row["attempt"],
        "created": unix(row["created"]),
        "delivery": row["delivery_id"],
        "error": row.get("error"),
        "event": row["event_id"],
        "latency_ms": row["latency_ms"],
        "livemode": False,
        "next_attempt_at": None if next_attempt_at is None else unix(next_attempt_at),
        "state": row["state"],
        "status_code": row.get("status_code"),
        "webhook_endpoint": row["endpoint_id"],
    }


def timeline_entry(entry_type: str, at: datetime, fields: Mapping[str, Any]) -> dict[str, Any]:
    """One entry of a PaymentIntent's timeline (payonce's own object; ops/timeline.py says
    what each type tells): `created` in Unix seconds as every object has it, and `time` to
    the millisecond, since a payment's steps are often within one second."""
    return {
        "object": "payment_intent.timeline_entry",
        "type": entry_type,
        "created": unix(at),
        "time": at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        **fields,
    }
