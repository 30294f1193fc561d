"""API objects as clients see them, rendered from database rows (or from a command, for the
202 answered before the command is applied). One renderer per object, used by the edge for
responses and by the processor for event payloads, so both always agree."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from contracts import ids


def unix(value: datetime | int) -> int:
    return value if isinstance(value, int) else int(value.timestamp())


def payment_intent(row: Mapping[str, Any], secret: bytes) -> dict[str, Any]:
    amount_received = row.get("amount_received") or 0
    return {
        "id": row["id"],
        "object": "payment_intent",
        "amount": row["amount"],
        "amount_capturable": 0,
        "amount_received": amount_received,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": row.get("capture_method") or "automatic",
        "client_secret": ids.client_secret(secret, row["id"]),
        "confirmation_method": "automatic",
        "created": unix(row["created"]),
        "currency": row["currency"],
        "customer": row.get("customer"),
        "description": row.get("description"),
        "last_payment_error": row.get("last_payment_error"),
        "latest_charge": row.get("latest_charge"),
        "livemode": False,
        "metadata": dict(row.get("metadata") or {}),
        "next_action": None,
        "payment_method": row.get("payment_method"),
        "payment_method_types": ["card"],
        "status": row["status"],
    }


def charge(row: Mapping[str, Any]) -> dict[str, Any]:
    succeeded = row["status"] == "succeeded"
    failed = row["status"] == "failed"
    return {
        "id": row["id"],
        "object": "charge",
        "amount": row["amount"],
        "amount_captured": row["amount_captured"],
        "amount_refunded": 0,
        "authorization_code": row.get("authorization_code"),
        "captured": row["amount_captured"] > 0,
        "created": unix(row["created"]),
        "currency": row["currency"],
        "failure_code": row.get("failure_code"),
        "failure_message": row.get("failure_message"),
        "livemode": False,
        "metadata": {},
        "outcome": {
            "network_status": "approved_by_network" if succeeded else "declined_by_network",
            "reason": row.get("decline_code") if failed else None,
            "type": "authorized" if succeeded else "issuer_declined" if failed else "pending",
        },
        "paid": succeeded,
        "payment_intent": row["payment_intent_id"],
        "payment_method": row["payment_method"],
        "refunded": False,
        "status": row["status"],
    }


def payment_error(row: Mapping[str, Any]) -> dict[str, Any]:
    """The `last_payment_error` a failed charge leaves on its intent."""
    return {
        "type": "card_error",
        "code": row["failure_code"],
        "decline_code": row.get("decline_code"),
        "message": row["failure_message"],
        "charge": row["id"],
        "payment_method": {"id": row["payment_method"], "object": "payment_method"},
    }


API_VERSION = "2024-06-20"


def event(row: Mapping[str, Any]) -> dict[str, Any]:
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
        "pending_webhooks": 0,
        "request": {"id": row.get("request_id"), "idempotency_key": row.get("idempotency_key")},
        "type": row["type"],
    }
