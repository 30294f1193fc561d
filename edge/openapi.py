"""The API's OpenAPI 3.1 document, served at `GET /openapi.json`.

Nothing in it is written twice. Each operation below names the parameter specs its handler
validates with (edge/params.py, edge/lists.py, edge/events.py, edge/reads.py,
edge/webhook_endpoints.py), and every parameter's schema is the one its validator carries
(`params.Validator.schema`): a limit changed in a validator changes the document. The object
schemas are contracts/schemas.py's (Stripe's published PaymentIntent, Charge and error;
payonce's own objects after contracts/objects.py). The tests hold the rest together: the
operations here are exactly the routes the app serves under /v1, the document validates as
OpenAPI 3.1, and schemathesis sends what it describes to a real stack and holds every answer to
its documented status and schema.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import orjson

from contracts import currencies, schemas
from contracts.objects import API_VERSION
from contracts.schemas import ref
from edge import events, intents, lists, params, reads, refunds, webhook_endpoints
from edge.idempotency import MAX_KEY_LENGTH
from edge.params import Field

OPENAPI_VERSION = "3.1.0"
TITLE = "payonce"
VERSION = "0.1.0"

_TAGS = [
    {"name": "PaymentIntents", "description": "Accepted at once (202), applied in order by the "
                                              "processor; read back with 425 until applied."},
    {"name": "Charges", "description": "The outcome of each payment attempt, as the processor "
                                       "recorded it."},
    {"name": "Refunds", "description": "Accepted at once (202, `pending`), applied in order "
                                       "with the intent's other commands, then `succeeded` or "
                                       "`failed` once the PSP answers."},
    {"name": "Events", "description": "What happened, newest first; redeliver one to a "
                                      "webhook endpoint."},
    {"name": "Webhook endpoints", "description": "Where events are delivered, and the "
                                                 "attempts made."},
]

_DESCRIPTION = f"""\
An asynchronous, Stripe-compatible PaymentIntents API that is safe to call any number of times.

**Authentication**: `Authorization: Bearer sk_test_…`, or HTTP Basic with the secret key as the
user name. A publishable key (`pk_test_…`) is refused (401) everywhere but one place, as at
Stripe: retrieving a PaymentIntent with its `client_secret`, which answers Stripe's subset of
its fields.

**Bodies**: `application/x-www-form-urlencoded` with Stripe's nested keys (`metadata[order]=42`,
lists as `enabled_events[0]=…` or `enabled_events[]=…`, booleans `true`/`false`) or
`application/json`, in UTF-8; the same parameters are the same request either way. In JSON,
integers and booleans may also be sent as the strings a form carries. An empty value unsets an
optional parameter. Query strings take the form encoding (`created[gte]=1700000000`).

**Idempotency**: every POST takes an `Idempotency-Key` (1-{MAX_KEY_LENGTH} printable ASCII
characters, scoped to the account). The same key and parameters replay the stored answer with
`Idempotent-Replayed: true`; other parameters are a 400 `idempotency_error`; a key still in
flight is a 409 with `Stripe-Should-Retry: true`. Requests that fail validation are not stored.

**Asynchronous answers**: a PaymentIntent command is answered **202** with the object as it
will be once applied, only after the command is durably queued. Reads answer **425 Too Early**
(with `Retry-After`) until it is applied.

**Outcomes in the answer**: with `Prefer: wait=N` (RFC 7240, N up to 30 seconds), a create
with `confirm=true`, a confirm and a capture wait, once accepted, for the payment's outcome:
200 with the PaymentIntent, or **402** `card_error` for a decline (with the `charge` and the
`payment_intent`), as Stripe answers; the 202 when the outcome does not come in time.

**Rate limits**: an account over `PAYONCE_RATE_LIMIT_PER_S` (when set) gets **429**
`rate_limit`, and so does a long-poll while too many wait on one edge process, and a POST
while one edge process runs its most at once (`PAYONCE_EDGE_MAX_POSTS`). Server errors
are 503 with `Stripe-Should-Retry: true` when a dependency is down or a publish was not
confirmed; retry with the same Idempotency-Key.

**Long-polls**: `GET /v1/payment_intents/{{id}}?wait=N` and `…/charge?wait=N` (N from 0 to 30
seconds) answer as soon as the intent changes while a command or a payment is under way (its
425 included), or at N with the state then; an intent with nothing under way answers at once.

**Errors** carry Stripe's error object: `{{"error": {{"type", "code", "message", "param"}}}}`, with
`code` and `param` only where there is one. Every answer has a `Request-Id` header.

Objects follow Stripe's API version {API_VERSION}; the schemas of PaymentIntent, Charge and
the error are Stripe's published ones.
"""


@dataclass(frozen=True, slots=True)
class Answer:
    description: str
    schema: str | None = None  # a component schema name; None for Stripe's error
    headers: tuple[str, ...] = ()
    # OpenAPI links: operation id -> where in the answer the next operation's `id` is.
    links: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Operation:
    """One route of the edge: what its handler validates and what it can answer."""

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    answers: Mapping[int, Answer]
    description: str = ""
    query: Mapping[str, Field] = field(default_factory=dict)
    body: Mapping[str, Field] | None = None
    # Parameters that also take `name[]=…` in a form (params.parse_form's `lists`).
    form_lists: Collection[str] = ()
    # The path's `{id}`: what an id of the object looks like. Others are answered 404.
    path_id: tuple[str, re.Pattern[str]] | None = None
    # Schema keywords added to body parameters for rules the handler checks beyond each
    # field's validator (e.g. the charge minimums).
    body_rules: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Takes `Prefer: wait=N` and may answer the outcome (edge/settle.py).
    waits: bool = False


# ---- answers ---------------------------------------------------------------------------------

_REPLAYED = ("Idempotent-Replayed",)


def _ok(description: str, schema: str, status: int = 200, post: bool = False,
        links: Mapping[str, str] | None = None) -> dict[int, Answer]:
    return {status: Answer(description, schema, _REPLAYED if post else (), links or {})}


# A charge exists once an intent is confirmed: the create links to the charge only through the
# confirm.
_INTENT_LINKS = dict.fromkeys(("GetPaymentIntentsIntent", "PostPaymentIntentsIntentConfirm",
                               "PostPaymentIntentsIntent", "PostPaymentIntentsIntentCancel"),
                              "$response.body#/id")
_CONFIRMED_LINKS = dict.fromkeys(("GetPaymentIntentsIntent", "GetPaymentIntentsIntentCharge",
                                  "GetPaymentIntentsIntentTimeline"), "$response.body#/id")
_ENDPOINT_LINKS = dict.fromkeys(("GetWebhookEndpointsId", "PostWebhookEndpointsId",
                                 "DeleteWebhookEndpointsId", "GetWebhookEndpointsIdDeliveries"),
                                "$response.body#/id")


E400 = Answer("Invalid parameters (`invalid_request_error`: `parameter_invalid`, "
              "`parameter_missing`, `parameter_unknown`, …).")
E400_POST = Answer("Invalid parameters or headers (`invalid_request_error`), or the "
                   "Idempotency-Key reused with other parameters (`idempotency_error`).")
E401 = Answer("No API key, one that matches no account, or a publishable key.")
E404 = Answer("No such object for this account (`resource_missing`).")
E409 = Answer("The same Idempotency-Key is still being executed (`idempotency_key_in_use`); "
              "retry shortly.", headers=("Stripe-Should-Retry", "Retry-After"))
E425 = Answer("Accepted but not applied yet (`resource_not_ready`); retry after `Retry-After` "
              "seconds.", headers=("Retry-After", "Stripe-Should-Retry"))
E402 = Answer("With `Prefer: wait=N`: the payment was declined (`card_error`, with `code`, "
              "`decline_code`, `charge` and the `payment_intent`).",
              headers=("Idempotent-Replayed", "Preference-Applied"))
E429 = Answer("The account sent more requests than its rate limit (`PAYONCE_RATE_LIMIT_PER_S`) "
              "allows, too many long-polls wait on this edge process, or it runs its most POSTs "
              "at once (`rate_limit`); nothing was done. Retry after `Retry-After` seconds (a "
              "long-poll also without `wait`).",
              headers=("Retry-After",))
E503 = Answer("A service payonce depends on is unreachable and nothing was done "
              "(`service_unavailable`), or a command's publish was not confirmed and it may "
              "still be applied (`outcome_unknown`). Retry with the same Idempotency-Key.",
              headers=("Stripe-Should-Retry",))


# Its description names the edge's body limit, filled in by `build`.
E413 = Answer("The request body is larger than the edge's limit (`request_too_large`).")


def _e413(max_body_bytes: int) -> Answer:
    return Answer(f"The request body is larger than {max_body_bytes} bytes "
                  "(`request_too_large`).")


def _errors(*statuses: int, post: bool = False) -> dict[int, Answer]:
    table = {400: E400_POST if post else E400, 401: E401, 404: E404, 409: E409, 425: E425,
             429: E429, 503: E503}
    return {status: table[status] for status in statuses}


def _outcome(description: str) -> dict[int, Answer]:
    """The answers of a POST that may wait for its payment's outcome."""
    return {200: Answer(f"With `Prefer: wait=N`, once the outcome came in time: {description}",
                        "payment_intent", ("Idempotent-Replayed", "Preference-Applied")),
            402: E402}


def _post_errors(*statuses: int) -> dict[int, Answer]:
    return {**_errors(400, 401, *statuses, 409, 429, 503, post=True), 413: E413}


def _get_errors(*statuses: int) -> dict[int, Answer]:
    return _errors(400, 401, *statuses, 429, 503)


# ---- the operations ----------------------------------------------------------------------------

_INTENT_ID = ("id", intents.INTENT_ID)
_EVENT_ID = ("id", events.EVENT_ID)
_ENDPOINT_ID = ("id", webhook_endpoints.ENDPOINT_ID)
_REFUND_ID = ("id", refunds.REFUND_ID)
_NO_PARAMS: Mapping[str, Field] = {}


def _charge_minimums() -> dict[str, Any]:
    """What params.charge_amount enforces beyond the amount's validator, from the same
    tables (contracts/currencies.py)."""
    return {
        "minimum": min(currencies.MINIMUMS.values()),
        "description": "In the currency's smallest unit, at least its minimum charge "
                       "(`amount_too_small`) and a multiple of its step "
                       "(`invalid_charge_amount`, `invalid_charge_amount_no_decimal_compatible`"
                       "): see `x-minimum-charge` and `x-amount-step`, by currency.",
        "x-minimum-charge": dict(currencies.MINIMUMS),
        "x-amount-step": {c: currencies.step(c) for c in sorted(currencies.CURRENCIES)
                          if currencies.step(c) != 1},
    }


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post", "/v1/payment_intents", "PostPaymentIntents", "Create a PaymentIntent",
        "PaymentIntents",
        {**_ok("The PaymentIntent as it will be once applied: `requires_payment_method`, "
               "`requires_confirmation` (with a payment method) or `processing` "
               "(`confirm=true`).", "payment_intent", 202, post=True, links=_INTENT_LINKS),
         **_outcome("`succeeded`, `requires_capture`, …"), **_post_errors()},
        description="`confirm=true` needs a `payment_method` (400 "
                    "`payment_intent_unexpected_state` without one).",
        body=params.CREATE_INTENT, body_rules={"amount": _charge_minimums()}, waits=True),
    Operation(
        "post", "/v1/payment_intents/{id}/confirm", "PostPaymentIntentsIntentConfirm",
        "Confirm a PaymentIntent", "PaymentIntents",
        {**_ok("The PaymentIntent, `processing`.", "payment_intent", 202, post=True,
               links=_CONFIRMED_LINKS),
         **_outcome("`succeeded`, or `requires_capture` for a manual capture."),
         **_post_errors(404, 425)},
        description="400 `payment_intent_unexpected_state` where its status forbids it, or "
                    "when it has no payment method and none is given. 425 while Redis's "
                    "recent data loss leaves it unknown whether the intent was accepted.",
        body=params.CONFIRM_INTENT, path_id=_INTENT_ID, waits=True),
    Operation(
        "get", "/v1/payment_intents/{id}", "GetPaymentIntentsIntent", "Retrieve a PaymentIntent",
        "PaymentIntents",
        {**_ok("The PaymentIntent, counting the commands accepted but not applied yet; with a "
               "publishable key, only the fields Stripe shows one.", "payment_intent"),
         **_get_errors(404, 425, 429)},
        description="425 while its create is accepted and not applied. `wait=N` waits up to N "
                    "seconds for a change while one is under way. A publishable key needs "
                    "`client_secret` (400 without it or with another); a secret key may "
                    "name it too.",
        query=intents.RETRIEVE_INTENT, path_id=_INTENT_ID),
    Operation(
        "get", "/v1/payment_intents/{id}/charge", "GetPaymentIntentsIntentCharge",
        "Retrieve the latest charge of a PaymentIntent", "PaymentIntents",
        {**_ok("The charge of the latest payment attempt; `authorization_code` is payonce's "
               "own field.", "payonce_charge"), **_get_errors(404, 425, 429)},
        description="425 while the intent is processing; 404 before its first attempt. "
                    "`wait=N` waits up to N seconds for the 425 to end.",
        query=intents.RETRIEVE_CHARGE, path_id=_INTENT_ID),
    Operation(
        "get", "/v1/payment_intents/{id}/timeline", "GetPaymentIntentsIntentTimeline",
        "What happened to a PaymentIntent", "PaymentIntents",
        {**_ok("Every command applied or refused, status transition, PSP attempt and result, "
               "event and webhook delivery attempt, oldest first.", "payment_intent_timeline"),
         **_get_errors(404, 425)},
        description="payonce's own endpoint, the API's view of `payonce trace`. Commands "
                    "accepted and not applied yet are not in it. 425 while its create is "
                    "accepted and not applied.",
        path_id=_INTENT_ID),
    # The lifecycle past confirmation (edge/lifecycle.py).
    Operation(
        "post", "/v1/payment_intents/{id}", "PostPaymentIntentsIntent",
        "Update a PaymentIntent", "PaymentIntents",
        {**_ok("The PaymentIntent as the update will leave it.", "payment_intent", 202,
               post=True, links=_INTENT_LINKS),
         **_post_errors(404, 425)},
        description="Only the parameters sent change; metadata is merged (an empty value "
                    "removes a key, an empty `metadata` removes every key). `amount`, "
                    "`currency`, `customer`, `payment_method` and `capture_method` only "
                    "before confirmation (400 `payment_intent_unexpected_state` after); "
                    "`metadata` and `description` any time. A `payment_method` makes a "
                    "`requires_payment_method` intent `requires_confirmation`.",
        body=params.UPDATE_INTENT, body_rules={"amount": _charge_minimums()},
        path_id=_INTENT_ID),
    Operation(
        "post", "/v1/payment_intents/{id}/capture", "PostPaymentIntentsIntentCapture",
        "Capture a PaymentIntent", "PaymentIntents",
        {**_ok("The PaymentIntent, `processing` while the PSP captures; then `succeeded` "
               "with `amount_received`.", "payment_intent", 202, post=True,
               links=_CONFIRMED_LINKS),
         **_outcome("`succeeded`, with `amount_received`."), **_post_errors(404, 425)},
        description="Only from `requires_capture` (400 `payment_intent_unexpected_state` "
                    "otherwise). `amount_to_capture` defaults to `amount_capturable`; more "
                    "is a 400 `amount_too_large`; what is not captured is released.",
        body=params.CAPTURE_INTENT, path_id=_INTENT_ID, waits=True),
    Operation(
        "post", "/v1/payment_intents/{id}/cancel", "PostPaymentIntentsIntentCancel",
        "Cancel a PaymentIntent", "PaymentIntents",
        {**_ok("The PaymentIntent, `canceled`.", "payment_intent", 202, post=True,
               links=_INTENT_LINKS),
         **_post_errors(404, 425)},
        description="From any status but `succeeded` and `canceled` (400 "
                    "`payment_intent_unexpected_state`), and not while a capture is under "
                    "way. A cancel while the intent is processing wins: the authorization "
                    "that comes back is voided (reversed, if it was captured). An "
                    "authorization held for a capture is released. A cancel the processor "
                    "finds too late (the payment succeeded before it was applied) changes "
                    "nothing: the intent reads as it is.",
        body=params.CANCEL_INTENT, path_id=_INTENT_ID),
    Operation(
        "get", "/v1/payment_intents", "GetPaymentIntents", "List PaymentIntents",
        "PaymentIntents",
        {**_ok("PaymentIntents, newest first, as applied by the processor.",
               "payment_intent_list", links=dict.fromkeys(
                   ("GetPaymentIntentsIntent", "GetPaymentIntentsIntentCharge"),
                   "$response.body#/data/0/id")),
         **_get_errors()},
        description="An intent whose create is accepted and not applied yet is not listed.",
        query=reads.LIST_INTENTS),
    Operation(
        "get", "/v1/charges", "GetCharges", "List charges", "Charges",
        {**_ok("Charges, newest first.", "charge_list", links=dict.fromkeys(
            ("GetChargesId",), "$response.body#/data/0/id")),
         **_get_errors()},
        description="`customer` is the customer of the charge's PaymentIntent.",
        query=reads.LIST_CHARGES),
    Operation(
        "get", "/v1/charges/{id}", "GetChargesId", "Retrieve a charge", "Charges",
        {**_ok("The charge; `authorization_code` is payonce's own field.", "payonce_charge"),
         **_get_errors(404)},
        path_id=("id", reads.CHARGE_ID)),
    Operation(
        "post", "/v1/refunds", "PostRefunds", "Create a refund", "Refunds",
        {**_ok("The refund, `pending`: the PSP's answer makes it `succeeded` or `failed`.",
               "refund", 202, post=True, links={"GetRefundsId": "$response.body#/id"}),
         **_post_errors(404, 425)},
        description="Exactly one of `payment_intent` and `charge`. 400 "
                    "`payment_intent_unexpected_state` when the intent has no successful "
                    "charge, `charge_not_refundable` for a charge not captured, "
                    "`charge_already_refunded`, and `amount_too_large` beyond what is left to "
                    "refund (counting refunds accepted and not applied yet). A refund accepted "
                    "at the same moment as another that leaves too little ends `failed` "
                    "(`failure_reason: insufficient_refundable_amount`) without moving money.",
        body=refunds.CREATE_REFUND),
    Operation(
        "get", "/v1/refunds", "GetRefunds", "List refunds", "Refunds",
        {**_ok("Refunds, newest first.", "refund_list",
               links={"GetRefundsId": "$response.body#/data/0/id"}), **_get_errors()},
        query=refunds.LIST_REFUNDS),
    Operation(
        "get", "/v1/refunds/{id}", "GetRefundsId", "Retrieve a refund", "Refunds",
        {**_ok("The refund.", "refund"), **_get_errors(404, 425)},
        description="425 while it is accepted and not applied.", path_id=_REFUND_ID),
    Operation(
        "get", "/v1/events", "GetEvents", "List events", "Events",
        {**_ok("Events, newest first.", "event_list", links=dict.fromkeys(
            ("GetEventsId", "PostEventsIdRetry"), "$response.body#/data/0/id")),
         **_get_errors()},
        description="`type` (with `*` wildcards) or `types`, not both.",
        query=events.LIST_EVENTS, form_lists=("types",)),
    Operation(
        "get", "/v1/events/{id}", "GetEventsId", "Retrieve an event", "Events",
        {**_ok("The event.", "event"), **_get_errors(404)}, path_id=_EVENT_ID),
    Operation(
        "post", "/v1/events/{id}/retry", "PostEventsIdRetry",
        "Redeliver an event to a webhook endpoint", "Events",
        {**_ok("The event; `pending_webhooks` counts the redelivery.", "event", post=True),
         **_post_errors(404)},
        description="400 when the endpoint does not exist, is disabled or does not receive "
                    "the event's type.",
        body=events.RETRY_EVENT, path_id=_EVENT_ID),
    Operation(
        "post", "/v1/webhook_endpoints", "PostWebhookEndpoints", "Create a webhook endpoint",
        "Webhook endpoints",
        {**_ok("The endpoint, with its signing `secret` (shown only here).",
               "webhook_endpoint", post=True, links=_ENDPOINT_LINKS), **_post_errors()},
        description="400 `url_invalid` for a URL payonce does not deliver to (private "
                    "addresses, unless allowed).",
        body=params.CREATE_WEBHOOK_ENDPOINT, form_lists=params.WEBHOOK_ENDPOINT_LISTS),
    Operation(
        "get", "/v1/webhook_endpoints", "GetWebhookEndpoints", "List webhook endpoints",
        "Webhook endpoints",
        {**_ok("Endpoints, newest first.", "webhook_endpoint_list"), **_get_errors()},
        query=lists.PAGE),
    Operation(
        "get", "/v1/webhook_endpoints/{id}", "GetWebhookEndpointsId",
        "Retrieve a webhook endpoint", "Webhook endpoints",
        {**_ok("The endpoint.", "webhook_endpoint"), **_get_errors(404)},
        path_id=_ENDPOINT_ID),
    Operation(
        "post", "/v1/webhook_endpoints/{id}", "PostWebhookEndpointsId",
        "Update a webhook endpoint", "Webhook endpoints",
        {**_ok("The endpoint.", "webhook_endpoint", post=True), **_post_errors(404)},
        description="Only the parameters sent change; metadata is merged.",
        body=params.UPDATE_WEBHOOK_ENDPOINT, form_lists=params.WEBHOOK_ENDPOINT_LISTS,
        path_id=_ENDPOINT_ID),
    Operation(
        "delete", "/v1/webhook_endpoints/{id}", "DeleteWebhookEndpointsId",
        "Delete a webhook endpoint", "Webhook endpoints",
        {**_ok("The deleted object.", "deleted_webhook_endpoint"), **_get_errors(404)},
        description="No Idempotency-Key needed; a second delete is a 404.",
        path_id=_ENDPOINT_ID),
    Operation(
        "get", "/v1/webhook_endpoints/{id}/deliveries", "GetWebhookEndpointsIdDeliveries",
        "List the delivery attempts of a webhook endpoint", "Webhook endpoints",
        {**_ok("Attempts, newest first.", "webhook_delivery_attempt_list"),
         **_get_errors(404)},
        query=webhook_endpoints.LIST_ATTEMPTS, path_id=_ENDPOINT_ID),
)


# ---- building the document -------------------------------------------------------------------

_HEADERS: dict[str, dict[str, Any]] = {
    "Request-Id": {"description": "The request's id (the client's `X-Request-Id` when it is "
                                  "short printable ASCII).",
                   "required": True, "schema": {"type": "string"}},
    "Idempotent-Replayed": {"description": "`true` on an answer replayed for a reused "
                                           "Idempotency-Key.",
                            "schema": {"type": "string", "enum": ["true"]}},
    "Retry-After": {"description": "Seconds to wait before retrying.",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "Stripe-Should-Retry": {"description": "Whether retrying the request can succeed, as "
                                           "Stripe's libraries read it.",
                            "schema": {"type": "string", "enum": ["true", "false"]}},
    "Preference-Applied": {"description": "`wait=N` when the answer is the outcome the "
                                          "request waited for.",
                           "schema": {"type": "string", "pattern": "^wait=[0-9]+$"}},
}

_PREFER = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": "`wait=N` (RFC 7240; N seconds, at most 30): answer the payment's outcome "
                   "(200, or 402 for a decline) if it comes within N, else the 202. Other "
                   "preferences are ignored.",
    "schema": {"type": "string"},
}

_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "description": "Scoped to the account; retries with the same key and parameters get the "
                   "first answer. Kept 24 hours.",
    # edge/idempotency.py's check_key: printable ASCII, 1 to MAX_KEY_LENGTH characters.
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH,
               "pattern": "^[\\x20-\\x7e]+$"},
}


def field_schema(name: str, spec_field: Field) -> dict[str, Any]:
    """The JSON Schema of one parameter: its validator's. params.validate reads an empty value
    as one not given, so a required text parameter cannot be empty."""
    check = spec_field.check
    if not isinstance(check, params.Validator):
        raise TypeError(f"parameter {name}: its validator carries no schema; make it a "
                        "params.Validator (params.accepts)")
    schema = dict(check.schema)
    if spec_field.required and schema.get("type") == "string":
        schema["minLength"] = max(1, schema.get("minLength", 0))
    elif (not spec_field.required and spec_field.may_be_empty
          and check not in params.EMPTY_IS_A_VALUE and not _admits_empty(schema)):
        # An empty value unsets an optional parameter: the document says it takes one.
        outer = {k: v for k, v in schema.items() if k == "description" or k.startswith("x-")}
        inner = {k: v for k, v in schema.items() if k not in outer}
        schema = {"anyOf": [inner, {"const": ""}], **outer}
    return schema


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A body parameter's schema that also takes JSON's null, which params.validate reads as a
    value not given."""
    outer = {k: v for k, v in schema.items() if k == "description" or k.startswith("x-")}
    inner = {k: v for k, v in schema.items() if k not in outer}
    branches = inner["anyOf"] if set(inner) == {"anyOf"} else [inner]
    return {"anyOf": [*branches, {"type": "null"}], **outer}


def _admits_empty(schema: Mapping[str, Any]) -> bool:
    """Whether the empty string is valid under a schema of the kinds validators state."""
    if "anyOf" in schema:
        return any(_admits_empty(s) for s in schema["anyOf"])
    if "const" in schema or "enum" in schema:
        return "" in schema.get("enum", [schema.get("const")])
    if schema.get("type") != "string" or "format" in schema or schema.get("minLength", 0) > 0:
        return False
    return re.search(schema.get("pattern", ""), "") is not None


def _nested(schema: Mapping[str, Any]) -> bool:
    """Whether a form carries the value under bracketed keys (a hash or a list)."""
    kinds = [schema.get("type")] + [b.get("type") for b in schema.get("anyOf", [])]
    return "object" in kinds or "array" in kinds


def _body(op: Operation) -> dict[str, Any]:
    assert op.body is not None
    properties = {}
    for name, spec_field in op.body.items():
        prop = field_schema(name, spec_field)
        if not spec_field.required and spec_field.may_be_empty:
            prop = _or_null(prop)
        rules = dict(op.body_rules.get(name, {}))
        if "description" in rules and "description" in prop:
            rules["description"] = f"{prop['description']} {rules['description']}"
        properties[name] = _note_form_list(op, name, {**prop, **rules})
    required = [name for name, f in op.body.items() if f.required]
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": False}
    if required:
        schema["required"] = required
    encoding = {name: {"style": "deepObject", "explode": True}
                for name, prop in properties.items() if _nested(prop)}
    return {
        "required": bool(required),
        "content": {
            "application/x-www-form-urlencoded": {"schema": schema, "encoding": encoding},
            "application/json": {"schema": schema},
        },
    }


def _note_form_list(op: Operation, name: str, schema: dict[str, Any]) -> dict[str, Any]:
    if name not in op.form_lists:
        return schema
    note = f"In a form, `{name}[0]=…&{name}[1]=…` or `{name}[]=…&{name}[]=…`."
    return {**schema, "description": f"{schema.get('description', '')} {note}".strip()}


def _parameters(op: Operation) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if op.path_id is not None:
        name, pattern = op.path_id
        out.append({"name": name, "in": "path", "required": True,
                    "description": "The object's id; any other string is answered 404.",
                    "schema": {"type": "string", "pattern": f"^{pattern.pattern}$"}})
    for name, spec_field in op.query.items():
        schema = field_schema(name, spec_field)
        parameter: dict[str, Any] = {"name": name, "in": "query", "required": spec_field.required,
                                     "schema": _note_form_list(op, name, schema)}
        if _nested(schema):
            parameter.update(style="deepObject", explode=True)
        out.append(parameter)
    if op.method == "post":
        out.append(_IDEMPOTENCY_KEY)
    if op.waits:
        out.append(_PREFER)
    return out


def _responses(op: Operation, max_body_bytes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, answer in sorted(op.answers.items()):
        if answer is E413:
            answer = _e413(max_body_bytes)
        schema = ref(answer.schema) if answer.schema is not None else ref("error")
        headers: dict[str, Any] = {"Request-Id": ref_header("Request-Id")}
        for name in answer.headers:
            headers[name] = ref_header(name)
        if status == 425:
            headers["Retry-After"] = {**_HEADERS["Retry-After"], "required": True}
        out[str(status)] = {"description": answer.description, "headers": headers,
                            "content": {"application/json": {"schema": schema}}}
        if answer.links:
            out[str(status)]["links"] = {
                target: {"operationId": target, "parameters": {"id": where}}
                for target, where in answer.links.items()}
    return out


def ref_header(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


def _operation(op: Operation, max_body_bytes: int) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary,
                           "tags": [op.tag]}
    if op.description:
        out["description"] = op.description
    parameters = _parameters(op)
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = _body(op)
    out["responses"] = _responses(op, max_body_bytes)
    return out


def _object_schemas() -> dict[str, Any]:
    found = schemas.components()
    found["payonce_charge"] = {
        "title": "Charge",
        "allOf": [ref("charge"), {"properties": {"authorization_code": {
            "anyOf": [{"type": "null"}, {"type": "string"}],
            "description": "The PSP's approval code, for a successful charge."}}}],
    }
    return found


def build(max_body_bytes: int) -> dict[str, Any]:
    """The whole document; `max_body_bytes` is the edge's body limit (its 413)."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, max_body_bytes)
    source = schemas.stripe_source()
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": TITLE, "version": VERSION, "description": _DESCRIPTION,
                 "x-stripe-schemas": {"repo": source["repo"], "commit": source["commit"],
                                      "api_version": source["api_version"]}},
        "tags": _TAGS,
        "security": [{"bearer": []}, {"basic": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "`Authorization: Bearer sk_test_…`"},
                "basic": {"type": "http", "scheme": "basic",
                          "description": "The secret key as the user name, no password."},
            },
            "headers": _HEADERS,
            "schemas": _object_schemas(),
        },
    }


@cache
def document_bytes(max_body_bytes: int) -> bytes:
    return orjson.dumps(build(max_body_bytes))
