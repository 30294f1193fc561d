"""Event routes: the events the processor wrote (read them, list them) and redelivering one
to a webhook endpoint on demand.

Events are listed newest first in `seq` order, the order the processor wrote them in. An
event's `pending_webhooks` counts its deliveries still to be made (state `pending`) to
endpoints not deleted since; the dispatcher writes those rows.

A redelivery (`POST /v1/events/{id}/retry`) is a row of webhook_deliveries set to `pending`,
due now (`next_attempt_at = now()`); the dispatcher picks it up as any due delivery. An attempt
under way keeps its lease (`locked_until` is left alone), so the event is never sent twice at
once; its settle sees the due time changed and leaves the delivery due, so the redelivery
follows it. `attempts` keeps counting: the new attempt gets the next number.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from aiohttp import web

from contracts import ids, objects, webhooks
from contracts.errors import InvalidRequest, ResourceMissing
from edge import lists, params, webhook_endpoints
from edge.accept import Outcome, idempotent, json_response
from edge.idempotency import check_key, fingerprint
from edge.keys import ACCOUNT_ID, DB, SETTINGS
from edge.params import Field
from ops.logs import bound

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

# What contracts/ids.py makes; anything else is found nowhere, without a lookup.
EVENT_ID = re.compile(r"evt_[0-9A-Za-z]{24}")

PENDING_WEBHOOKS = """
(SELECT count(*) FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id
 WHERE d.event_id = e.id AND d.state = 'pending' AND w.deleted_at IS NULL)
"""
SELECT_EVENTS = f"""
SELECT e.*, {PENDING_WEBHOOKS} AS pending_webhooks FROM events e WHERE e.account_id = $1
"""
FETCH_EVENT = SELECT_EVENTS + " AND e.id = $2"
EVENT_POSITION = "SELECT seq FROM events WHERE account_id = $1 AND id = $2"
# delivery_success as Stripe means it: true when every delivery of the event succeeded (or
# it had none to make), false when one is still pending or failed.
ALL_DELIVERED = """
NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id
            AND d.state <> 'succeeded')
"""
NOT_ALL_DELIVERED = f"NOT {ALL_DELIVERED}"
# A delete or an update of the endpoint waits until the redelivery is recorded.
SHARE_ENDPOINT = webhook_endpoints.FETCH_ENDPOINT + " FOR SHARE"
# Pending and due now. The event's object, place in the outbox and exchange come from its row,
# as when the dispatcher records a delivery. The due time always changes (now() is later than
# any due time a dispatcher claimed), which is how a dispatcher settling an attempt claimed
# before learns that a retry was asked for meanwhile and leaves the delivery due.
SCHEDULE_DELIVERY = """
INSERT INTO webhook_deliveries (id, account_id, endpoint_id, event_id, object_id, event_seq,
                                exchange, state, next_attempt_at)
SELECT $1, e.account_id, $2, e.id, e.object_id, e.seq, e.exchange, 'pending', now()
FROM events e WHERE e.id = $3 AND e.account_id = $4
ON CONFLICT (endpoint_id, event_id) DO UPDATE
SET state = 'pending',
    next_attempt_at = now(),
    updated_at = now()
RETURNING id, attempts
"""

EVENTS = lists.Listing(noun="event", ids=EVENT_ID, select=SELECT_EVENTS,
                       position=EVENT_POSITION, key=("e.seq",), created="e.created")

LIST_EVENTS = {
    **lists.PAGE,
    **lists.CREATED,
    "type": Field(params.string(200)),
    # Stripe takes up to 20 types.
    "types": Field(params.list_of(params.string(200), 20)),
    "delivery_success": Field(params.boolean),
}
RETRY_EVENT = {"webhook_endpoint": Field(params.string(100), required=True)}


def render(row: Any) -> dict[str, Any]:
    return objects.event(row, pending_webhooks=row["pending_webhooks"])


def no_such_event(event_id: str) -> ResourceMissing:
    return ResourceMissing(f"No such event: '{event_id[:64]}'", param="id")


def type_pattern(wanted: str) -> str:
    """A LIKE pattern for a type with `*` wildcards (`payment_intent.*`); `_` and `%` are
    literal there, as in event types."""
    escaped = wanted.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


@routes.get("/v1/events/{id}")
async def retrieve_event(request: web.Request) -> web.Response:
    event_id = request.match_info["id"]
    params.validate(params.read_query(request), {})
    row = None
    if EVENT_ID.fullmatch(event_id):
        row = await request.app[DB].fetchrow(FETCH_EVENT, request[ACCOUNT_ID], event_id)
    if row is None:
        raise no_such_event(event_id)
    return json_response(render(row))


@routes.get("/v1/events")
async def list_events(request: web.Request) -> web.Response:
    values = params.validate(params.read_query(request, lists=("types",)), LIST_EVENTS)
    where = lists.Where(request[ACCOUNT_ID])
    wanted, types = values["type"], values["types"]
    if wanted is not None and types is not None:
        raise InvalidRequest("You may pass either type or types, not both.", param="types")
    if wanted is not None:
        if "*" in wanted:
            where.add("e.type LIKE {}", type_pattern(wanted))
        else:
            where.add("e.type = {}", wanted)
    if types is not None:
        where.add("e.type = ANY({}::text[])", types)
    if values["delivery_success"] is not None:
        where.add(ALL_DELIVERED if values["delivery_success"] else NOT_ALL_DELIVERED)
    rows, has_more = await lists.page(request.app[DB], EVENTS, where, values)
    return json_response(lists.envelope("/v1/events", [render(r) for r in rows], has_more))


@routes.post("/v1/events/{id}/retry")
async def retry_event(request: web.Request) -> web.Response:
    """Deliver the event to the endpoint again, now: 200 with the event, whose
    `pending_webhooks` counts the redelivery."""
    event_id = request.match_info["id"]
    key = check_key(request.headers.get("Idempotency-Key"))
    values = params.validate(await params.read_params(request), RETRY_EVENT)
    fp = fingerprint("POST", f"/v1/events/{event_id}/retry", values)
    account_id = request[ACCOUNT_ID]
    endpoint_id = values["webhook_endpoint"]
    secret = request.app[SETTINGS].secret_bytes

    async def execute() -> Outcome:
        async with request.app[DB].acquire() as conn, conn.transaction():
            event = None
            if EVENT_ID.fullmatch(event_id):
                event = await conn.fetchrow(FETCH_EVENT, account_id, event_id)
            if event is None:
                raise no_such_event(event_id)
            endpoint = None
            if webhook_endpoints.ENDPOINT_ID.fullmatch(endpoint_id):
                endpoint = await conn.fetchrow(SHARE_ENDPOINT, endpoint_id, account_id)
            if endpoint is None:
                raise InvalidRequest(f"No such webhook endpoint: '{endpoint_id[:64]}'",
                                     code="resource_missing", param="webhook_endpoint")
            if endpoint["status"] != "enabled":
                raise InvalidRequest(
                    f"The webhook endpoint '{endpoint_id}' is disabled: enable it (disabled="
                    "false) to have events delivered to it.", param="webhook_endpoint")
            if not webhooks.receives(endpoint["enabled_events"], event["type"]):
                raise InvalidRequest(
                    f"The webhook endpoint '{endpoint_id}' does not receive {event['type']} "
                    "events: add the type to its enabled_events first.",
                    param="webhook_endpoint")
            delivery = await conn.fetchrow(
                SCHEDULE_DELIVERY, ids.webhook_delivery_id(secret, endpoint_id, event_id),
                endpoint_id, event_id, account_id)
            row = await conn.fetchrow(FETCH_EVENT, account_id, event_id)
        log.info("redelivery scheduled", extra={"ids": {
            "event": event_id, "webhook_endpoint": endpoint_id, "delivery": delivery["id"],
            "attempts_before": delivery["attempts"]}})
        return Outcome(200, orjson.dumps(render(row)))

    with bound(event=event_id):
        return await idempotent(request, key, fp, execute)
