"""Refund routes: accept a refund (202, `pending`), read one (200, 425, 404), list them.

A refund is a command on its intent's partition (processor/refunds.py decides it against the
charge, one refund of an intent at a time); the PSP's answer follows as another. The edge
refuses what it can tell is wrong from what it sees: the intent not succeeded, the charge not
captured, or an amount beyond what is left to refund, counting the refunds Postgres holds and
the ones accepted and not applied yet (their pending markers, contracts/pending.py, on the
intent). Two refunds accepted at the same moment by different requests can still both pass
here; the processor then fails the one that does not fit, and no money moves for it.

An accepted refund not applied yet reads as 425: its marker sits on its intent, which a
locator in Redis (`refund:{account}:{refund}`, written before the publish) names.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from contracts import currencies, ids, objects
from contracts.commands import CreateRefund
from contracts.enums import ChargeStatus, IntentStatus, RefundReason
from contracts.errors import (
    InvalidRequest,
    ParameterInvalid,
    ParameterMissing,
    ResourceMissing,
    TooEarly,
)
from contracts.refunds import not_refundable
from edge import lists, params
from edge.accept import (
    Outcome,
    accept,
    applied_before,
    idempotent,
    json_response,
    unavailable,
)
from edge.idempotency import check_key, fingerprint
from edge.intents import APPLIED_KEYS, RETRY_AFTER_S, current_view, unknown_intent
from edge.keys import ACCOUNT_ID, DB, IDEMPOTENCY, PENDING, REDIS, REQUEST_ID, SETTINGS
from edge.params import Field, accepts
from ops.logs import bound

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

# What contracts/ids.py makes; anything else is found nowhere, without a lookup.
REFUND_ID = re.compile(r"re_[0-9A-Za-z]{24}")
CHARGE_ID = re.compile(r"ch_[0-9A-Za-z]{24}")

FETCH_REFUND = "SELECT * FROM refunds WHERE id = $1 AND account_id = $2"
FETCH_CHARGE = "SELECT * FROM charges WHERE id = $1 AND account_id = $2"
# One statement, so one snapshot: a refund committed meanwhile is either in both the charge's
# amount_refunded and the ids found, or in neither.
CHARGE_AND_KNOWN_REFUNDS = """
SELECT c.*, ARRAY(SELECT r.id FROM refunds r WHERE r.id = ANY($3::text[])) AS known
FROM charges c WHERE c.id = $1 AND c.account_id = $2
"""
SELECT_REFUNDS = "SELECT r.* FROM refunds r WHERE r.account_id = $1"
REFUND_POSITION = "SELECT seq FROM refunds WHERE account_id = $1 AND id = $2"

REFUNDS = lists.Listing(noun="refund", ids=REFUND_ID, select=SELECT_REFUNDS,
                        position=REFUND_POSITION, key=("r.seq",),
                        created="r.created")

_REASONS = sorted(RefundReason)


@accepts({"type": "integer", "minimum": 1, "maximum": params.MAX_AMOUNT,
          "description": "In the currency's smallest unit; by default what is left to refund."})
def refund_amount(value: Any, param: str) -> int:
    number = params.amount(value, param)
    if number < 1:
        raise ParameterInvalid("Invalid positive integer", code="parameter_invalid_integer",
                               param=param)
    return number


@accepts({"type": "string", "enum": _REASONS})
def reason(value: Any, param: str) -> str:
    if value not in _REASONS:
        raise ParameterInvalid(f"Invalid {param}: must be one of {', '.join(_REASONS[:-1])}, "
                               f"or {_REASONS[-1]}", param=param)
    return str(value)


_OBJECT_ID = params.string(255)

CREATE_REFUND = {
    "payment_intent": Field(_OBJECT_ID),
    "charge": Field(_OBJECT_ID),
    "amount": Field(refund_amount),
    "reason": Field(reason),
    "metadata": Field(params.metadata),
}
LIST_REFUNDS = {
    **lists.PAGE,
    **lists.CREATED,
    "charge": Field(_OBJECT_ID),
    "payment_intent": Field(_OBJECT_ID),
}


def create_refund(raw: dict[str, Any]) -> dict[str, Any]:
    values = params.validate(raw, CREATE_REFUND)
    if values["payment_intent"] is None and values["charge"] is None:
        raise ParameterMissing("One of the following params should be provided for this "
                               "request: payment_intent or charge.", param="payment_intent")
    if values["payment_intent"] is not None and values["charge"] is not None:
        raise InvalidRequest("You may only specify one of these parameters: charge, "
                             "payment_intent.", param="charge")
    values["metadata"] = values["metadata"] or {}
    return values


def _money(amount: int, currency: str) -> str:
    """An amount as Stripe's refund errors write it: `$3.01` in dollars, else `3.01 eur`."""
    text = currencies.display(amount, currency)
    return f"${text.removesuffix(' usd')}" if currency == "usd" else text


def no_such_charge(charge_id: str) -> ResourceMissing:
    return ResourceMissing(f"No such charge: '{charge_id[:64]}'", param="charge")


def no_such_refund(refund_id: str) -> ResourceMissing:
    return ResourceMissing(f"No such refund: '{refund_id[:64]}'", param="id")


def locator(account_id: str, refund_id: str) -> str:
    return f"refund:{account_id}:{refund_id}"


async def _target(request: web.Request, values: dict[str, Any]) -> tuple[str, Any]:
    """(the intent, its charge to refund); the errors Stripe gives when there is none."""
    db = request.app[DB]
    account_id = request[ACCOUNT_ID]
    if values["charge"] is not None:
        charge_id = values["charge"]
        charge = await db.fetchrow(FETCH_CHARGE, charge_id, account_id) \
            if CHARGE_ID.fullmatch(charge_id) else None
        if charge is None:
            raise no_such_charge(charge_id)
        if charge["status"] != ChargeStatus.SUCCEEDED or charge["amount_captured"] <= 0:
            raise InvalidRequest(
                f"Charge {charge_id} has a status of {charge['status']} and has not been "
                "captured: only a captured charge can be refunded.",
                code="charge_not_refundable", param="charge")
        return charge["payment_intent_id"], charge
    intent_id = values["payment_intent"]
    current, row, _ = await current_view(request, intent_id)
    if current is None:
        unknown = await unknown_intent(request, intent_id)
        if isinstance(unknown, ResourceMissing):
            unknown.param = "payment_intent"
        raise unknown
    if row is None:  # its create is not applied yet
        raise not_refundable(intent_id, current["status"])
    if current["status"] != IntentStatus.SUCCEEDED or row["latest_charge"] is None:
        raise not_refundable(intent_id, current["status"])
    charge = await db.fetchrow(FETCH_CHARGE, row["latest_charge"], account_id)
    return intent_id, charge


async def _left_to_refund(request: web.Request, intent_id: str, charge_id: str) -> tuple[int, Any]:
    """(what is left to refund of the charge, the charge row), counting the refunds accepted
    and not applied yet.

    Read in this order: the pending markers (dropping those whose command the inbox has
    applied or rejected), then, in one statement, the charge and which of the markers' refunds
    Postgres has. A refund applied after the markers were read is in the charge's
    `amount_refunded` and among the refunds found, or in neither and counted by its marker:
    counted once either way. Read the other way round it could be in neither.
    """
    app = request.app
    account_id = request[ACCOUNT_ID]
    try:
        pending = [(key, obj) for key, obj in await app[PENDING].all(account_id, intent_id)
                   if obj.get("object") == "refund" and obj.get("charge") == charge_id]
    except RedisError as exc:
        raise unavailable("redis", exc) from exc
    db = app[DB]
    if pending:
        applied = {r["idempotency_key"] for r in
                   await db.fetch(APPLIED_KEYS, account_id, [k for k, _ in pending])}
        pending = [(k, obj) for k, obj in pending if k not in applied]
    charge = await db.fetchrow(CHARGE_AND_KNOWN_REFUNDS, charge_id, account_id,
                               [obj["id"] for _, obj in pending])
    known = set(charge["known"])
    unapplied = sum(obj["amount"] for _, obj in pending if obj["id"] not in known)
    left = charge["amount_captured"] - charge["amount_refunded"] - unapplied
    return max(left, 0), charge


@routes.post("/v1/refunds")
async def create(request: web.Request) -> web.Response:
    key = check_key(request.headers.get("Idempotency-Key"))
    values = create_refund(await params.read_params(request))
    fp = fingerprint("POST", "/v1/refunds", values)
    settings = request.app[SETTINGS]
    account_id = request[ACCOUNT_ID]
    refund_id = ids.refund_id(settings.secret_bytes, account_id, key)

    async def execute() -> Outcome:
        replay = await applied_before(request, key, fp, fetch=FETCH_REFUND,
                                      render=objects.refund)
        if replay is not None:
            return replay
        intent_id, charge = await _target(request, values)
        left, charge = await _left_to_refund(request, intent_id, charge["id"])
        currency = charge["currency"]
        if left == 0:
            raise InvalidRequest(f"Charge {charge['id']} has already been refunded.",
                                 code="charge_already_refunded",
                                 param="charge" if values["charge"] else "payment_intent")
        amount = values["amount"] or left
        if amount > left:
            raise InvalidRequest(
                f"Refund amount ({_money(amount, currency)}) is greater than unrefunded "
                f"amount on charge ({_money(left, currency)})",
                code="amount_too_large", param="amount")
        now = int(time.time())
        command = CreateRefund(
            account_id=account_id, intent_id=intent_id, request_id=request[REQUEST_ID],
            accepted_at=now, idempotency_key=key, fingerprint=fp, refund_id=refund_id,
            charge_id=charge["id"], amount=amount, reason=values["reason"],
            metadata=values["metadata"])
        projected = objects.refund({
            "id": refund_id, "amount": amount, "charge_id": charge["id"], "created": now,
            "currency": currency, "metadata": values["metadata"],
            "payment_intent_id": intent_id, "reason": values["reason"], "status": "pending"})
        try:
            await request.app[REDIS].set(locator(account_id, refund_id), intent_id,
                                         ex=settings.pending_ttl_s)
        except RedisError as exc:
            raise unavailable("redis", exc) from exc
        with bound(intent=intent_id):
            return await accept(request, command, projected)

    with bound(refund=refund_id):
        return await idempotent(request, key, fp, execute)


@routes.get("/v1/refunds/{id}")
async def retrieve(request: web.Request) -> web.Response:
    """The refund as Postgres has it; 425 while it is accepted and not applied."""
    refund_id = request.match_info["id"]
    params.validate(params.read_query(request), {})
    if not REFUND_ID.fullmatch(refund_id):
        raise no_such_refund(refund_id)
    app = request.app
    account_id = request[ACCOUNT_ID]
    # Markers before the row: a refund applied in between is then in the row.
    try:
        intent_id = await app[REDIS].get(locator(account_id, refund_id))
        pending = [] if intent_id is None else await app[PENDING].all(
            account_id, intent_id.decode() if isinstance(intent_id, bytes) else intent_id)
    except RedisError as exc:
        raise unavailable("redis", exc) from exc
    row = await app[DB].fetchrow(FETCH_REFUND, refund_id, account_id)
    if row is not None:
        return json_response(objects.refund(row))
    if any(obj.get("id") == refund_id for _, obj in pending) or \
            await app[IDEMPOTENCY].lost_within(app[SETTINGS].pending_loss_grace_s):
        raise TooEarly(f"The refund '{refund_id}' is not applied yet; retry after a moment.",
                       headers={"Retry-After": RETRY_AFTER_S, "Stripe-Should-Retry": "true"})
    raise no_such_refund(refund_id)


@routes.get("/v1/refunds")
async def list_refunds(request: web.Request) -> web.Response:
    values = params.validate(params.read_query(request), LIST_REFUNDS)
    where = lists.Where(request[ACCOUNT_ID])
    if values["charge"] is not None:
        where.add("r.charge_id = {}", values["charge"])
    if values["payment_intent"] is not None:
        where.add("r.payment_intent_id = {}", values["payment_intent"])
    rows, has_more = await lists.page(request.app[DB], REFUNDS, where, values)
    return json_response(lists.envelope("/v1/refunds", [objects.refund(r) for r in rows],
                                        has_more))
