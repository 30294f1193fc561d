"""PaymentIntent routes: accept commands (202) and answer reads (200, 425, 404). Reads may wait
for a change (`wait=N`, edge/waiters.py); retrieving an intent also takes a publishable key
with the intent's client_secret (edge/auth.py)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from contracts import ids, objects
from contracts.commands import ConfirmIntent, CreateIntent
from contracts.enums import CaptureMethod, IntentStatus
from contracts.errors import (
    InvalidRequest,
    ParameterMissing,
    PayonceError,
    ResourceMissing,
    TooEarly,
)
from contracts.transitions import Action, next_status, state
from edge import params
from edge.accept import (
    FETCH_INTENT,
    Outcome,
    accept,
    applied_before,
    idempotent,
    json_response,
    unavailable,
)
from edge.auth import PUBLISHABLE
from edge.idempotency import check_key, fingerprint
from edge.keys import (
    ACCOUNT_ID,
    DB,
    IDEMPOTENCY,
    KEY_KIND,
    PENDING,
    REQUEST_ID,
    SETTINGS,
    WAITERS,
)
from edge.params import Field
from edge.settle import waited
from edge.waiters import MAX_WAIT_S, Reading, answer_when_changed
from ops.logs import bound

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

FETCH_CHARGE = "SELECT * FROM charges WHERE id = $1 AND account_id = $2"
APPLIED_KEYS = """
SELECT idempotency_key FROM inbox WHERE account_id = $1 AND idempotency_key = ANY($2::text[])
"""

# What contracts/ids.py makes; anything else is answered 404 without a lookup (and could not
# be passed to Postgres as text if it held a NUL).
INTENT_ID = re.compile(r"pi_[0-9A-Za-z]{24}")

# Clients polling a 425 come back after this many seconds; most commands apply within it.
RETRY_AFTER_S = "1"


@routes.post("/v1/payment_intents")
async def create_intent(request: web.Request) -> web.Response:
    key = check_key(request.headers.get("Idempotency-Key"))
    values = params.create_intent(await params.read_params(request))
    fp = fingerprint("POST", "/v1/payment_intents", values)
    settings = request.app[SETTINGS]
    account_id = request[ACCOUNT_ID]
    intent_id = ids.intent_id(settings.secret_bytes, account_id, key)
    if values["confirm"]:
        status = IntentStatus.PROCESSING
    elif values["payment_method"]:
        status = IntentStatus.REQUIRES_CONFIRMATION
    else:
        status = IntentStatus.REQUIRES_PAYMENT_METHOD
    now = int(time.time())
    capture_method = values.get("capture_method") or CaptureMethod.AUTOMATIC.value
    # Known before the key is claimed, so the claim writes its pending marker too.
    projected = objects.payment_intent(
        {**values, "capture_method": capture_method, "id": intent_id, "status": status,
         "created": now}, settings.secret_bytes)

    async def execute() -> Outcome:
        replay = await applied_before(request, key, fp)
        if replay is not None:
            return replay
        command = CreateIntent(
            account_id=account_id, intent_id=intent_id, request_id=request[REQUEST_ID],
            accepted_at=now, idempotency_key=key, fingerprint=fp,
            **{**values, "capture_method": capture_method})
        accepted = await accept(request, command, projected)
        if not values["confirm"]:
            return accepted
        return await waited(request, intent_id, accepted, lambda: read_intent(request, intent_id))

    with bound(intent=intent_id):
        return await idempotent(request, key, fp, execute, marks=(intent_id, projected))


async def current_view(
    request: web.Request, intent_id: str
) -> tuple[dict[str, Any] | None, Any, list[dict[str, Any]]]:
    """(the intent as the client will see it once every accepted command is applied, its
    Postgres row, the objects of the accepted commands not applied yet).

    Read in this order: the pending commands, then which of them the inbox has applied, then
    the row. A command is dropped from the pending list only when its inbox row was committed,
    and so its effect is in the row read after; one applied after the inbox check just stays
    pending for this read. In any other order a command committed in between would be in
    neither, and an accepted create would answer 404.
    """
    if not INTENT_ID.fullmatch(intent_id):
        return None, None, []
    app = request.app
    account_id = request[ACCOUNT_ID]
    try:
        pending = await app[PENDING].all(account_id, intent_id)
    except RedisError as exc:
        raise unavailable("redis", exc) from exc
    db = app[DB]
    if pending:
        applied = {r["idempotency_key"] for r in
                   await db.fetch(APPLIED_KEYS, account_id, [k for k, _ in pending])}
        for key in applied:
            await app[PENDING].remove(account_id, intent_id, key)
        pending = [(k, obj) for k, obj in pending if k not in applied]
    row = await db.fetchrow(FETCH_INTENT, intent_id, account_id)
    # The intent's partition also carries its refunds (edge/refunds.py): they leave it as is.
    unapplied = [obj for _, obj in pending if obj.get("object") == "payment_intent"]
    if unapplied:
        return unapplied[-1], row, unapplied
    if row is not None:
        return objects.payment_intent(row, app[SETTINGS].secret_bytes), row, []
    return None, None, []


async def unknown_intent(request: web.Request, intent_id: str) -> PayonceError:
    """404, unless Redis lost its data lately: the intent may then be a create accepted and
    still queued whose marker was lost, so the client is told to retry (425), not that it
    does not exist."""
    settings = request.app[SETTINGS]
    if INTENT_ID.fullmatch(intent_id) and await request.app[IDEMPOTENCY].lost_within(
            settings.pending_loss_grace_s):
        return TooEarly(
            f"The payment_intent '{intent_id}' is not known yet: it may have been accepted and "
            "not applied; retry after a moment.",
            headers={"Retry-After": RETRY_AFTER_S, "Stripe-Should-Retry": "true"})
    return no_such_intent(intent_id)


def no_such_intent(intent_id: str) -> ResourceMissing:
    return ResourceMissing(f"No such payment_intent: '{intent_id[:64]}'", param="intent")


@routes.post("/v1/payment_intents/{id}/confirm")
async def confirm_intent(request: web.Request) -> web.Response:
    intent_id = request.match_info["id"]
    key = check_key(request.headers.get("Idempotency-Key"))
    values = params.confirm_intent(await params.read_params(request))
    fp = fingerprint("POST", f"/v1/payment_intents/{intent_id}/confirm", values)
    account_id = request[ACCOUNT_ID]

    async def execute() -> Outcome:
        replay = await applied_before(request, key, fp)
        if replay is not None:
            return replay
        current, _, _ = await current_view(request, intent_id)
        if current is None:
            raise await unknown_intent(request, intent_id)
        status = next_status(Action.CONFIRM, state(current))
        payment_method = values["payment_method"] or current["payment_method"]
        if payment_method is None:
            raise InvalidRequest(
                "You cannot confirm this PaymentIntent because it's missing a payment method. "
                "Pass payment_method.", code="payment_intent_unexpected_state",
                param="payment_method")
        command = ConfirmIntent(
            account_id=account_id, intent_id=intent_id, request_id=request[REQUEST_ID],
            accepted_at=int(time.time()), idempotency_key=key, fingerprint=fp,
            payment_method=values["payment_method"],
            capture_method=values.get("capture_method"))
        projected = {**current, "status": status, "payment_method": payment_method,
                     "capture_method": values.get("capture_method") or current["capture_method"],
                     "last_payment_error": None}
        accepted = await accept(request, command, projected)
        return await waited(request, intent_id, accepted, lambda: read_intent(request, intent_id))

    with bound(intent=intent_id):
        return await idempotent(request, key, fp, execute)


def too_early(what: str) -> TooEarly:
    return TooEarly(f"The {what} is not ready yet; retry after a moment.",
                    headers={"Retry-After": RETRY_AFTER_S})


# Stripe's client secrets are `{id}_secret_{25 characters}`; it takes up to 5000 characters.
CLIENT_SECRET_MAX = 5000
WAIT = Field(params.bounded_integer(0, MAX_WAIT_S))
RETRIEVE_INTENT = {"client_secret": Field(params.string(CLIENT_SECRET_MAX)), "wait": WAIT}
RETRIEVE_CHARGE = {"wait": WAIT}
# What Stripe shows of a PaymentIntent to a publishable key: the fields a browser needs to
# finish or show a payment, nothing of the merchant's (metadata, customer, amounts received).
PUBLISHABLE_FIELDS = (
    "id", "object", "amount", "amount_details", "automatic_payment_methods", "canceled_at",
    "cancellation_reason", "capture_method", "client_secret", "confirmation_method",
    "created", "currency", "description", "excluded_payment_method_types",
    "last_payment_error", "livemode", "next_action", "payment_method",
    "payment_method_configuration_details", "payment_method_types", "processing",
    "receipt_email", "setup_future_usage", "shipping", "status",
)


def read_query(request: web.Request) -> dict[str, str]:
    """The query's parameters by their names as sent (`expand[0]` is a name of its own, and
    unknown here); one given twice is refused rather than one of its values picked."""
    values: dict[str, str] = {}
    for name, value in request.query.items():
        if name in values:
            raise InvalidRequest(f"Received the parameter {name} twice.", param=name)
        values[name] = value
    return values


def check_client_secret(request: web.Request, intent_id: str, client_secret: str | None) -> None:
    """A publishable key must name the intent's client_secret; a secret key may, and then it
    must be the intent's too."""
    if client_secret is None:
        if request[KEY_KIND] == PUBLISHABLE:
            raise ParameterMissing(
                "You must pass the PaymentIntent's client_secret to retrieve it with a "
                "publishable key.", param="client_secret")
        return
    secret = request.app[SETTINGS].secret_bytes
    if not (client_secret.startswith(f"{intent_id}_secret_")
            and ids.client_secret_matches(secret, client_secret)):
        raise InvalidRequest(
            "The client_secret provided does not match the client_secret associated with the "
            "PaymentIntent.", code="payment_intent_invalid_parameter", param="client_secret")


def for_publishable_key(intent: dict[str, Any]) -> dict[str, Any]:
    return {name: intent[name] for name in PUBLISHABLE_FIELDS if name in intent}


async def read_intent(request: web.Request, intent_id: str) -> Reading:
    """The intent as GET answers it, and whether a change is under way: a command accepted and
    not applied, or a payment at the PSP."""
    current, row, unapplied = await current_view(request, intent_id)
    if row is not None and current is not None:
        return Reading(current, bool(unapplied) or row["status"] == IntentStatus.PROCESSING)
    if current is not None:
        return Reading(too_early("payment_intent"), True)
    return Reading(await unknown_intent(request, intent_id), False)


async def read_charge(request: web.Request, intent_id: str) -> Reading:
    _, row, unapplied = await current_view(request, intent_id)
    if row is None and not unapplied:
        return Reading(await unknown_intent(request, intent_id), False)
    if unapplied or row["status"] == IntentStatus.PROCESSING:
        return Reading(too_early("charge of this payment_intent"), True)
    if row["latest_charge"] is None:
        return Reading(ResourceMissing(f"The payment_intent '{intent_id}' has no charge yet; "
                                       "confirm it first.", param="intent"), False)
    charge = await request.app[DB].fetchrow(FETCH_CHARGE, row["latest_charge"],
                                            request[ACCOUNT_ID])
    return Reading(objects.charge(charge), False)


async def answer(request: web.Request, intent_id: str,
                 read: Callable[[], Awaitable[Reading]], wait_s: int | None) -> dict[str, Any]:
    """The object `read` finds, once it changed when `wait_s` asks to wait; raises the error
    it finds instead."""
    reading = await answer_when_changed(request, request.app[WAITERS], request[ACCOUNT_ID],
                                        intent_id, read, wait_s)
    if isinstance(reading.answer, PayonceError):
        raise reading.answer
    return reading.answer


@routes.get("/v1/payment_intents/{id}")
async def retrieve_intent(request: web.Request) -> web.Response:
    """The intent as it stands, counting commands accepted but not applied yet: a client told
    `processing` by a confirm's 202 never reads an older status after it. 425 while its create
    is not applied. `wait=N` waits up to N seconds for a change while one is under way
    (edge/waiters.py). A publishable key gets Stripe's subset of the fields, with the
    intent's client_secret."""
    intent_id = request.match_info["id"]
    values = params.validate(read_query(request), RETRIEVE_INTENT)
    with bound(intent=intent_id):
        check_client_secret(request, intent_id, values["client_secret"])
        try:
            intent = await answer(request, intent_id, lambda: read_intent(request, intent_id),
                                  values["wait"])
        except ResourceMissing:
            if request[KEY_KIND] == PUBLISHABLE:
                # The secret is the intent's, but the key is another account's.
                raise ResourceMissing(
                    "The client_secret provided does not match any associated PaymentIntent "
                    "on this account. Ensure the publishable key used belongs to the same "
                    "account that created the PaymentIntent.", param="client_secret") from None
            raise
        if request[KEY_KIND] == PUBLISHABLE:
            intent = for_publishable_key(intent)
        return json_response(intent)


@routes.get("/v1/payment_intents/{id}/charge")
async def retrieve_charge(request: web.Request) -> web.Response:
    """The outcome of the latest payment attempt: 425 until it is known; `wait=N` waits up to
    N seconds for it."""
    intent_id = request.match_info["id"]
    values = params.validate(read_query(request), RETRIEVE_CHARGE)
    with bound(intent=intent_id):
        return json_response(await answer(
            request, intent_id, lambda: read_charge(request, intent_id), values["wait"]))
