"""`GET /v1/payment_intents/{id}/timeline`: what happened to a PaymentIntent, oldest first,
as a Stripe-shaped list of `payment_intent.timeline_entry` objects (ops/timeline.py gathers
them, for `payonce trace` too). The whole history is one page: `has_more` is always false.

404 for an intent the account does not have, 425 while its create is not applied, as for
`GET /v1/payment_intents/{id}`."""

from __future__ import annotations

from aiohttp import web

from contracts import objects
from contracts.errors import PayonceError
from edge import intents, lists, params
from edge.accept import json_response
from edge.keys import DB
from ops import timeline
from ops.logs import bound

routes = web.RouteTableDef()


def url(intent_id: str) -> str:
    return f"/v1/payment_intents/{intent_id}/timeline"


@routes.get("/v1/payment_intents/{id}/timeline")
async def intent_timeline(request: web.Request) -> web.Response:
    intent_id = request.match_info["id"]
    params.validate(intents.read_query(request), {})
    with bound(intent=intent_id):
        # The intent as a GET reads it: the account's own, and applied.
        reading = await intents.read_intent(request, intent_id)
        if isinstance(reading.answer, PayonceError):
            raise reading.answer
        async with request.app[DB].acquire() as conn:
            entries = await timeline.gather(conn, intent_id)
        data = [objects.timeline_entry(e.type, e.at, e.fields) for e in entries]
        return json_response(lists.envelope(url(intent_id), data, False))
