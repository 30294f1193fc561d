"""JSON Schemas (2020-12, as OpenAPI 3.1 takes them) of every object the API answers with.

Stripe's PaymentIntent, Charge, Refund and error come from Stripe's published OpenAPI spec
(`stripe_schemas.json` beside this module: the closure of those three schemas, from the commit
its `_source` names). That spec is OpenAPI 3.0: `stripe()` rewrites its `nullable: true` as
JSON Schema has it, and leaves the rest as published, so Stripe's objects do not forbid extra
fields.

The objects Stripe's file lacks (Event, the lists, WebhookEndpoint, the deleted object,
payonce's delivery attempt and PaymentIntent timeline entry) are written here after
contracts/objects.py, field for field and strict (every field required, no others), so a
field added to a renderer and not here, or the other way round, fails the tests that hold
answers to these schemas.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from contracts import objects, webhooks
from contracts.enums import EventType, IntentStatus

REF = "#/components/schemas/"


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def _nullable_30(schema: Any) -> Any:
    """One OpenAPI 3.0 schema object as JSON Schema: `nullable: true` becomes an `anyOf` with
    null, which also covers Stripe's nullable `anyOf`s and enums that would refuse null."""
    if isinstance(schema, list):
        return [_nullable_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: _nullable_30(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "oneOf", "allOf"):
            out[key] = _nullable_30(value)
        else:
            out[key] = value
    if schema.get("nullable") is True:
        return {"anyOf": [{"type": "null"}, out]}
    return out


@cache
def _stripe_file() -> dict[str, Any]:
    text = resources.files("contracts").joinpath("stripe_schemas.json").read_text("utf-8")
    return json.loads(text)  # type: ignore[no-any-return]


def stripe_source() -> dict[str, Any]:
    """Where Stripe's schemas come from (repository, commit, API version)."""
    return dict(_stripe_file()["_source"])


def stripe() -> dict[str, Any]:
    """Stripe's schemas by component name: `payment_intent`, `charge`, `error` and what they
    reference."""
    return {name: _nullable_30(schema) for name, schema in _stripe_file()["schemas"].items()}


def _strict(properties: dict[str, Any], *, optional: tuple[str, ...] = (),
            **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
        **extra,
    }


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [{"type": "null"}, schema]}


_ID = {"type": "string"}
_UNIX = {"type": "integer", "description": "Unix seconds."}
_METADATA = {"type": "object", "additionalProperties": {"type": "string"}}
_LIVEMODE = {"type": "boolean", "const": False}
_API_VERSION = {"type": "string", "const": objects.API_VERSION}


def _list(name: str, item: str, url: str) -> dict[str, Any]:
    return _strict({
        "object": {"type": "string", "const": "list"},
        "url": {"type": "string", "const": url} if "{" not in url else
               {"type": "string", "pattern": "^" + url.replace("{id}", "[^/]+") + "$"},
        "has_more": {"type": "boolean"},
        "data": {"type": "array", "items": ref(item)},
    }, title=name, description=f"A page of {item} objects, newest first.")


def _timeline_entry() -> dict[str, Any]:
    """One schema per entry type (ops/timeline.py), told apart by `type`."""
    def text(pattern: str | None = None) -> dict[str, Any]:
        return {"type": "string", "pattern": pattern} if pattern else {"type": "string"}

    status = {"type": "string", "enum": sorted(IntentStatus)}
    count = {"type": "integer", "minimum": 0}
    kinds: dict[str, tuple[str, dict[str, Any]]] = {
        "command": ("A command the processor applied or refused (its inbox row).", {
            "command": text(), "idempotency_key": text(), "request_id": _nullable(text()),
            "outcome": {"type": "string", "enum": ["applied", "rejected"]},
            "error": _nullable({"type": "object",
                                "description": "Why it was refused, as the API's error."}),
        }),
        "attempt_created": ("A payment attempt at the PSP began.", {
            "attempt": text("^pa_"), "charge": text("^ch_"), "psp_key": text(),
            "amount": {"type": "integer", "minimum": 1}, "currency": text("^[a-z]{3}$"),
            "payment_method": text(),
        }),
        "psp_result": ("What the PSP's books say it answered to the attempt.", {
            "attempt": text("^pa_"), "psp_key": text(),
            "outcome": {"type": "string", "enum": ["authorized", "captured", "declined"]},
            "authorization_code": _nullable(text()), "failure_code": _nullable(text()),
            "decline_code": _nullable(text()),
        }),
        "attempt_updated": ("Where the attempt stands: pending, reported or settled.", {
            "attempt": text("^pa_"),
            "state": {"type": "string", "enum": ["pending", "reported", "settled"]},
            "tries": count, "reports": count, "result": _nullable({"type": "object"}),
        }),
        "task_created": ("A PSP task began: capturing, voiding or reversing what an attempt "
                         "authorized.", {
            "task": text("^pt_"), "kind": {"type": "string",
                                           "enum": ["capture", "void", "reverse"]},
            "amount": count, "psp_key": text(),
        }),
        "psp_operation": ("The PSP's books recorded the task's operation.", {
            "task": text("^pt_"), "kind": {"type": "string",
                                           "enum": ["capture", "void", "reverse"]},
            "psp_key": text(),
        }),
        "task_updated": ("Where the task stands: pending, reported or settled.", {
            "task": text("^pt_"),
            "state": {"type": "string", "enum": ["pending", "reported", "settled"]},
            "tries": count, "reports": count, "result": _nullable({"type": "object"}),
        }),
        "refund_created": ("A refund of the intent's charge was recorded.", {
            "refund": text("^re_"), "amount": count, "psp_key": text(),
        }),
        "psp_refund": ("What the PSP's books say of the refund.", {
            "refund": text("^re_"), "psp_key": text(),
            "outcome": {"type": "string", "enum": ["succeeded", "failed"]},
        }),
        "refund_updated": ("Where the refund stands, and its PSP task.", {
            "refund": text("^re_"),
            "status": {"type": "string", "enum": ["pending", "succeeded", "failed"]},
            "failure_reason": _nullable(text()), "task": text(), "tries": count,
        }),
        "transition": ("The intent took a status (`from` null for its first).", {
            "from": _nullable(status), "to": status, "event": text("^evt_"),
        }),
        "event": ("An event of the intent or of its charge.", {
            "event": text("^evt_"), "event_type": {"type": "string", "enum": sorted(EventType)},
            "object_id": text(), "previous_status": _nullable(text()),
            "status": _nullable(text()), "published": {"type": "boolean"},
        }),
        "webhook_attempt": ("An attempt to deliver one of those events to an endpoint.", {
            "event": text("^evt_"), "webhook_endpoint": text("^we_"),
            "attempt": {"type": "integer", "minimum": 1},
            "status_code": _nullable({"type": "integer", "minimum": 100, "maximum": 599}),
            "error": _nullable({"type": "string", "maxLength": 1000}),
            "latency_ms": count,
        }),
    }
    return {
        "title": "PaymentIntentTimelineEntry",
        "description": "One thing that happened to a PaymentIntent (payonce's own object).",
        "oneOf": [_strict({
            "object": {"type": "string", "const": "payment_intent.timeline_entry"},
            "type": {"type": "string", "const": name},
            "created": _UNIX,
            "time": {"type": "string", "format": "date-time",
                     "description": "The same instant, to the millisecond (UTC)."},
            **fields,
        }, description=description) for name, (description, fields) in kinds.items()],
    }


def payonce() -> dict[str, Any]:
    """payonce's own object schemas by component name, after contracts/objects.py."""
    webhook_endpoint = _strict({
        "id": {"type": "string", "pattern": "^we_[0-9A-Za-z]{24}$"},
        "object": {"type": "string", "const": "webhook_endpoint"},
        "api_version": _API_VERSION,
        "application": {"type": "null"},
        "created": _UNIX,
        "description": _nullable({"type": "string", "maxLength": 5000}),
        "enabled_events": {"type": "array", "minItems": 1, "items": {
            "type": "string", "enum": [webhooks.ALL_EVENTS, *sorted(webhooks.SUBSCRIBABLE)]}},
        "livemode": _LIVEMODE,
        "metadata": _METADATA,
        "secret": {"type": "string", "pattern": "^whsec_",
                   "description": "The signing secret: only in the answer to the create (and "
                                  "its replays)."},
        "status": {"type": "string", "enum": ["enabled", "disabled"]},
        "url": {"type": "string"},
    }, optional=("secret",), title="WebhookEndpoint")
    event = _strict({
        "id": {"type": "string", "pattern": "^evt_[0-9A-Za-z]{24}$"},
        "object": {"type": "string", "const": "event"},
        "account": _ID,
        "api_version": _API_VERSION,
        "created": _UNIX,
        "data": _strict({
            "object": {"anyOf": [ref("payment_intent"), ref("charge"), ref("refund"),
                                 ref("webhook_endpoint")]},
            "previous_attributes": {"type": "object",
                                    "description": "The fields that changed, as they were."},
        }, optional=("previous_attributes",)),
        "livemode": _LIVEMODE,
        "pending_webhooks": {"type": "integer", "minimum": 0,
                             "description": "Deliveries of the event still to be made."},
        "request": _strict({"id": _nullable(_ID), "idempotency_key": _nullable(_ID)}),
        "type": {"type": "string", "enum": sorted(EventType)},
    }, title="Event")
    attempt = _strict({
        "id": {"type": "string", "pattern": "^whd_[0-9A-Za-z]{24}_[1-9][0-9]*$"},
        "object": {"type": "string", "const": "webhook_delivery_attempt"},
        "attempt": {"type": "integer", "minimum": 1},
        "created": _UNIX,
        "delivery": {"type": "string", "pattern": "^whd_[0-9A-Za-z]{24}$"},
        "error": _nullable({"type": "string", "maxLength": 1000}),
        "event": _ID,
        "latency_ms": {"type": "integer", "minimum": 0},
        "livemode": _LIVEMODE,
        "next_attempt_at": _nullable(_UNIX),
        "state": {"type": "string", "enum": ["pending", "succeeded", "failed"],
                  "description": "The delivery's state now."},
        "status_code": _nullable({"type": "integer", "minimum": 100, "maximum": 599}),
        "webhook_endpoint": _ID,
    }, title="WebhookDeliveryAttempt",
        description="One attempt to deliver an event to a webhook endpoint (payonce's own "
                    "object).")
    return {
        "event": event,
        "event_list": _list("EventList", "event", "/v1/events"),
        "payment_intent_list": _list("PaymentIntentList", "payment_intent",
                                     "/v1/payment_intents"),
        "charge_list": _list("ChargeList", "charge", "/v1/charges"),
        "webhook_endpoint": webhook_endpoint,
        "webhook_endpoint_list": _list("WebhookEndpointList", "webhook_endpoint",
                                       "/v1/webhook_endpoints"),
        "refund_list": _list("RefundList", "refund", "/v1/refunds"),
        "deleted_webhook_endpoint": _strict({
            "id": {"type": "string"},
            "object": {"type": "string", "const": "webhook_endpoint"},
            "deleted": {"type": "boolean", "const": True},
        }, title="DeletedWebhookEndpoint"),
        "webhook_delivery_attempt": attempt,
        "webhook_delivery_attempt_list": _list(
            "WebhookDeliveryAttemptList", "webhook_delivery_attempt",
            "/v1/webhook_endpoints/{id}/deliveries"),
        "payment_intent_timeline_entry": _timeline_entry(),
        "payment_intent_timeline": {
            **_list("PaymentIntentTimeline", "payment_intent_timeline_entry",
                    "/v1/payment_intents/{id}/timeline"),
            "description": "What happened to a PaymentIntent, oldest first, all on one page.",
        },
    }


def components() -> dict[str, Any]:
    """Every schema, Stripe's and payonce's, by component name."""
    return {**stripe(), **payonce()}
