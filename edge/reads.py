"""Lists of PaymentIntents and Charges, and charges by id: reads of what the processor wrote,
from Postgres.

Both lists are Stripe's (edge/lists.py): newest first by `(created, id)`, keyset pages with
`starting_after` / `ending_before`, `created` filters. A list shows what is applied: an intent
whose create was accepted and not applied yet is not in it (`GET /v1/payment_intents/{id}`
answers 425 for it), and a charge is listed once the processor recorded its attempt's result.

A charge has no customer of its own: it is its intent's, so `GET /v1/charges?customer=…`
filters on the intent's. Objects are rendered as their retrieves render them
(contracts/objects.py), so a listed object is the one `GET …/{id}` answers once applied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from contracts import objects
from contracts.errors import ResourceMissing
from edge import lists, params
from edge.accept import json_response
from edge.intents import INTENT_ID
from edge.keys import ACCOUNT_ID, DB, SETTINGS
from edge.params import Field
from ops.logs import bound

routes = web.RouteTableDef()

# What contracts/ids.py makes; anything else is found nowhere, without a lookup.
CHARGE_ID = re.compile(r"ch_[0-9A-Za-z]{24}")

SELECT_INTENTS = "SELECT p.* FROM payment_intents p WHERE p.account_id = $1"
INTENT_POSITION = "SELECT created, id FROM payment_intents WHERE account_id = $1 AND id = $2"
SELECT_CHARGES = "SELECT c.* FROM charges c WHERE c.account_id = $1"
CHARGE_POSITION = "SELECT created, id FROM charges WHERE account_id = $1 AND id = $2"
FETCH_CHARGE = "SELECT * FROM charges WHERE account_id = $1 AND id = $2"
# The charge's intent is the customer's. Written as a semi-join, the planner can start from
# either side (ops/migrations/0007_lists.sql).
OF_CUSTOMER = """
EXISTS (SELECT 1 FROM payment_intents p WHERE p.account_id = c.account_id
        AND p.id = c.payment_intent_id AND p.customer = {})
"""

INTENTS = lists.Listing(noun="payment_intent", ids=INTENT_ID, select=SELECT_INTENTS,
                        position=INTENT_POSITION, key=("p.created", "p.id"),
                        created="p.created")
CHARGES = lists.Listing(noun="charge", ids=CHARGE_ID, select=SELECT_CHARGES,
                        position=CHARGE_POSITION, key=("c.created", "c.id"),
                        created="c.created")

# 255: what an intent's customer may hold (params.CREATE_INTENT, the payment_intents table).
CUSTOMER = Field(params.string(255))
LIST_INTENTS = {**lists.PAGE, **lists.CREATED, "customer": CUSTOMER}
LIST_CHARGES = {
    **lists.PAGE,
    **lists.CREATED,
    "customer": CUSTOMER,
    # Any string up to 255 characters, as ids are taken elsewhere: one that names no intent of
    # the account has no charges to list, like an intent not confirmed yet.
    "payment_intent": Field(params.string(255)),
}


def intents_where(account_id: str, values: Mapping[str, Any]) -> lists.Where:
    """The account's intents that `values` (LIST_INTENTS, validated) filter for."""
    where = lists.Where(account_id)
    if values["customer"] is not None:
        where.add("p.customer = {}", values["customer"])
    return where


def charges_where(account_id: str, values: Mapping[str, Any]) -> lists.Where:
    """The account's charges that `values` (LIST_CHARGES, validated) filter for."""
    where = lists.Where(account_id)
    if values["customer"] is not None:
        where.add(OF_CUSTOMER, values["customer"])
    if values["payment_intent"] is not None:
        where.add("c.payment_intent_id = {}", values["payment_intent"])
    return where


def no_such_charge(charge_id: str) -> ResourceMissing:
    return ResourceMissing(f"No such charge: '{charge_id[:64]}'", param="id")


@routes.get("/v1/payment_intents")
async def list_intents(request: web.Request) -> web.Response:
    values = params.validate(params.read_query(request), LIST_INTENTS)
    where = intents_where(request[ACCOUNT_ID], values)
    rows, has_more = await lists.page(request.app[DB], INTENTS, where, values)
    secret = request.app[SETTINGS].secret_bytes
    return json_response(lists.envelope(
        "/v1/payment_intents", [objects.payment_intent(r, secret) for r in rows], has_more))


@routes.get("/v1/charges")
async def list_charges(request: web.Request) -> web.Response:
    values = params.validate(params.read_query(request), LIST_CHARGES)
    where = charges_where(request[ACCOUNT_ID], values)
    rows, has_more = await lists.page(request.app[DB], CHARGES, where, values)
    return json_response(lists.envelope("/v1/charges", [objects.charge(r) for r in rows],
                                        has_more))


@routes.get("/v1/charges/{id}")
async def retrieve_charge(request: web.Request) -> web.Response:
    charge_id = request.match_info["id"]
    params.validate(params.read_query(request), {})
    with bound(charge=charge_id):
        row = None
        if CHARGE_ID.fullmatch(charge_id):
            row = await request.app[DB].fetchrow(FETCH_CHARGE, request[ACCOUNT_ID], charge_id)
        if row is None:
            raise no_such_charge(charge_id)
        return json_response(objects.charge(row))
