"""PaymentIntent routes: accept commands (202) and answer reads (200, 425, 404)."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from contracts import ids, objects
from contracts.commands import ConfirmIntent, CreateIntent
from contracts.enums import IntentStatus
from contracts.errors import (
    InvalidRequest,
    PayonceError,
    ResourceMissing,
    TooEarly,
)
from contracts.transitions import Action, next_status
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
from edge.idempotency import check_key, fingerprint
from edge.keys import (
    ACCOUNT_ID,
    DB,
    IDEMPOTENCY,
    PENDING,
    REQUEST_ID,
    SETTINGS,
)
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

    async def execute() -> Outcome:
        replay = await applied_before(request, key, fp)
        if replay is not None:
            return replay
        if values["confirm"]:
            status = IntentStatus.PROCESSING
        elif values["payment_method"]:
            status = IntentStatus.REQUIRES_CONFIRMATION
        else:
            status = IntentStatus.REQUIRES_PAYMENT_METHOD
        now = int(time.time())
        command = CreateIntent(
            account_id=account_id, intent_id=intent_id, request_id=request[REQUEST_ID],
            accepted_at=now, idempotency_key=key, fingerprint=fp, **values)
        projected = objects.payment_intent(
            {**values, "id": intent_id, "status": status, "created": now}, settings.secret_bytes)
        return await accept(request, command, projected)

    with bound(intent=intent_id):
        return await idempotent(request, key, fp, execute)


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
        status = next_status(Action.CONFIRM, IntentStatus(current["status"]))
        payment_method = values["payment_method"] or current["payment_method"]
        if payment_method is None:
            raise InvalidRequest(
                "You cannot confirm this PaymentIntent because it's missing a payment method. "
                "Pass payment_method.", code="payment_intent_unexpected_state",
                param="payment_method")
        command = ConfirmIntent(
            account_id=account_id, intent_id=intent_id, request_id=request[REQUEST_ID],
            accepted_at=int(time.time()), idempotency_key=key, fingerprint=fp,
            payment_method=values["payment_method"])
        projected = {**current, "status": status, "payment_method": payment_method,
                     "last_payment_error": None}
        return await accept(request, command, projected)

    with bound(intent=intent_id):
        return await idempotent(request, key, fp, execute)


def too_early(what: str) -> TooEarly:
    return TooEarly(f"The {what} is not ready yet; retry after a moment.",
                    headers={"Retry-After": RETRY_AFTER_S})


@routes.get("/v1/payment_intents/{id}")
async def retrieve_intent(request: web.Request) -> web.Response:
    """The intent as it stands, counting commands accepted but not applied yet: a client told
    `processing` by a confirm's 202 never reads an older status after it. 425 while its create
    is not applied."""
    intent_id = request.match_info["id"]
    params.validate(request.query, {})
    with bound(intent=intent_id):
        current, row, _ = await current_view(request, intent_id)
        if row is not None:
            return json_response(current)
        if current is not None:
            raise too_early("payment_intent")
        raise await unknown_intent(request, intent_id)


@routes.get("/v1/payment_intents/{id}/charge")
async def retrieve_charge(request: web.Request) -> web.Response:
    """The outcome of the latest payment attempt: 425 until it is known."""
    intent_id = request.match_info["id"]
    params.validate(request.query, {})
    with bound(intent=intent_id):
        _, row, unapplied = await current_view(request, intent_id)
        if row is None and not unapplied:
            raise await unknown_intent(request, intent_id)
        if unapplied or row["status"] == IntentStatus.PROCESSING:
            raise too_early("charge of this payment_intent")
        if row["latest_charge"] is None:
            raise ResourceMissing(f"The payment_intent '{intent_id}' has no charge yet; "
                                  "confirm it first.", param="intent")
        charge = await request.app[DB].fetchrow(FETCH_CHARGE, row["latest_charge"],
                                                request[ACCOUNT_ID])
        return json_response(objects.charge(charge))
