"""Webhook endpoint routes: create, read, list, update and delete endpoints, and list the
attempts made to deliver events to one.

Endpoints are configuration without side effects outside payonce, so the edge writes them to
Postgres itself (no command, no 202): a create answers 200 with the endpoint and its signing
secret, as Stripe does. The secret is derived from the endpoint's id (contracts/ids.py) and
never stored: it is shown in the answer to the create and its replays only.

Every POST goes through the idempotent pipeline (edge/accept.py). A create's id is derived
from (account, Idempotency-Key) and its row keeps the request's fingerprint, so a retry after
any loss (Redis flushed, the answer lost on the way) lands on the same endpoint, and the same
key with other parameters is an idempotency error even when Redis no longer knows it.

A URL is checked for form before the key is claimed, and for where it points (public
addresses only, unless `webhook_allow_private`) when the endpoint is written: that needs DNS,
and a host that does not resolve is a 400 that changes nothing. The dispatcher checks again at
every delivery. A deleted endpoint is kept (deleted_at) for its deliveries' sake, answers 404
and receives nothing more.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from aiohttp import web

from contracts import ids, objects
from contracts.errors import ParameterInvalid, ResourceMissing
from contracts.webhook_urls import WebhookURLError, check_deliverable
from edge import lists, params
from edge.accept import Outcome, idempotent, json_response
from edge.idempotency import check_key, fingerprint, mismatch
from edge.keys import ACCOUNT_ID, DB, SETTINGS
from edge.params import Field
from ops.logs import bound
from ops.settings import Settings

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

ENDPOINT_ID = re.compile(r"we_[0-9A-Za-z]{24}")
# A delivery attempt's id: its delivery's and its number (webhook_attempts.attempt is an
# integer, so at most 10 digits).
ATTEMPT_ID = re.compile(r"whd_[0-9A-Za-z]{24}_[1-9][0-9]{0,9}")

# ON CONFLICT: the id is the key's, so the row is there already when this is a retry.
INSERT_ENDPOINT = """
INSERT INTO webhook_endpoints (id, account_id, url, description, metadata, enabled_events,
                               fingerprint)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (id) DO NOTHING
RETURNING *
"""
# Deleted ones too: a retry of a create is answered with its endpoint whatever became of it.
FETCH_CREATED = "SELECT * FROM webhook_endpoints WHERE id = $1 AND account_id = $2"
FETCH_ENDPOINT = """
SELECT * FROM webhook_endpoints WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL
"""
LOCK_ENDPOINT = FETCH_ENDPOINT + " FOR UPDATE"
UPDATE_ENDPOINT = """
UPDATE webhook_endpoints
SET url = $3, enabled_events = $4, description = $5, metadata = $6, status = $7,
    disabled_reason = $8, failing_since = $9, updated_at = now()
WHERE id = $1 AND account_id = $2
RETURNING *
"""
DELETE_ENDPOINT = """
UPDATE webhook_endpoints SET deleted_at = now(), updated_at = now()
WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL
RETURNING id
"""
SELECT_ENDPOINTS = """
SELECT * FROM webhook_endpoints w WHERE w.account_id = $1 AND w.deleted_at IS NULL
"""
ENDPOINT_POSITION = """
SELECT created, id FROM webhook_endpoints
WHERE account_id = $1 AND id = $2 AND deleted_at IS NULL
"""
SELECT_ATTEMPTS = """
SELECT a.*, d.event_id, d.endpoint_id, d.state
FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
WHERE d.endpoint_id = $1 AND d.account_id = $2
"""
# The cursor is ATTEMPT_ID, checked before this runs, so both parts parse.
ATTEMPT_POSITION = """
SELECT a.created, a.delivery_id, a.attempt
FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
WHERE d.endpoint_id = $1 AND d.account_id = $2
  AND a.delivery_id = substring($3 from '^(whd_[0-9A-Za-z]{24})_')
  AND a.attempt = substring($3 from '_([0-9]+)$')::bigint
"""

ENDPOINTS = lists.Listing(noun="webhook endpoint", ids=ENDPOINT_ID, select=SELECT_ENDPOINTS,
                          position=ENDPOINT_POSITION, key=("w.created", "w.id"))
ATTEMPTS = lists.Listing(noun="webhook delivery attempt", ids=ATTEMPT_ID,
                         select=SELECT_ATTEMPTS, position=ATTEMPT_POSITION,
                         key=("a.created", "a.delivery_id", "a.attempt"), created="a.created")

LIST_ATTEMPTS = {**lists.PAGE, **lists.CREATED, "event": Field(params.string(100))}


def no_such_endpoint(endpoint_id: str) -> ResourceMissing:
    return ResourceMissing(f"No such webhook endpoint: '{endpoint_id[:64]}'",
                           param="webhook_endpoint")


async def deliverable(url: str, settings: Settings) -> None:
    try:
        await check_deliverable(url, allow_private=settings.webhook_allow_private)
    except WebhookURLError as exc:
        raise ParameterInvalid(str(exc), code="url_invalid", param="url") from None


async def fetch_endpoint(request: web.Request, endpoint_id: str) -> Any:
    row = None
    if ENDPOINT_ID.fullmatch(endpoint_id):
        row = await request.app[DB].fetchrow(FETCH_ENDPOINT, endpoint_id, request[ACCOUNT_ID])
    if row is None:
        raise no_such_endpoint(endpoint_id)
    return row


@routes.post("/v1/webhook_endpoints")
async def create_endpoint(request: web.Request) -> web.Response:
    key = check_key(request.headers.get("Idempotency-Key"))
    values = params.create_webhook_endpoint(
        await params.read_params(request, lists=params.WEBHOOK_ENDPOINT_LISTS))
    fp = fingerprint("POST", "/v1/webhook_endpoints", values)
    settings = request.app[SETTINGS]
    account_id = request[ACCOUNT_ID]
    endpoint_id = ids.webhook_endpoint_id(settings.secret_bytes, account_id, key)

    async def execute() -> Outcome:
        await deliverable(values["url"], settings)
        db = request.app[DB]
        row = await db.fetchrow(INSERT_ENDPOINT, endpoint_id, account_id, values["url"],
                                values["description"], values["metadata"],
                                values["enabled_events"], fp)
        headers = {}
        if row is None:
            # Created by an earlier try whose answer Redis does not have (any more).
            row = await db.fetchrow(FETCH_CREATED, endpoint_id, account_id)
            if row is None or row["fingerprint"] != fp:
                raise mismatch(key)
            headers["Idempotent-Replayed"] = "true"
        else:
            # Not the URL: merchants put tokens in them.
            log.info("webhook endpoint created")
        secret = ids.webhook_secret(settings.secret_bytes, endpoint_id)
        return Outcome(200, orjson.dumps(objects.webhook_endpoint(row, secret=secret)), headers)

    with bound(webhook_endpoint=endpoint_id):
        return await idempotent(request, key, fp, execute)


@routes.get("/v1/webhook_endpoints/{id}")
async def retrieve_endpoint(request: web.Request) -> web.Response:
    params.validate(params.read_query(request), {})
    return json_response(objects.webhook_endpoint(
        await fetch_endpoint(request, request.match_info["id"])))


@routes.get("/v1/webhook_endpoints")
async def list_endpoints(request: web.Request) -> web.Response:
    values = params.validate(params.read_query(request), lists.PAGE)
    rows, has_more = await lists.page(request.app[DB], ENDPOINTS,
                                      lists.Where(request[ACCOUNT_ID]), values)
    return json_response(lists.envelope(
        "/v1/webhook_endpoints", [objects.webhook_endpoint(r) for r in rows], has_more))


def updated(row: Any, changes: dict[str, Any]) -> dict[str, Any]:
    """The endpoint's columns once `changes` (params.update_webhook_endpoint) are applied."""
    new = {
        "url": changes.get("url", row["url"]),
        "enabled_events": changes.get("enabled_events", list(row["enabled_events"])),
        "description": changes.get("description", row["description"]),
        "metadata": dict(row["metadata"]),
        "status": row["status"],
        "disabled_reason": row["disabled_reason"],
        "failing_since": row["failing_since"],
    }
    if "metadata" in changes:
        change = changes["metadata"]
        merged = {} if change["clear"] else new["metadata"]
        merged.update(change["set"])
        for name in change["unset"]:
            merged.pop(name, None)
        if len(merged) > params.METADATA_MAX_KEYS:
            raise ParameterInvalid(f"Metadata can have at most {params.METADATA_MAX_KEYS} keys; "
                                   f"this update would leave {len(merged)}.", param="metadata")
        new["metadata"] = merged
    if "disabled" in changes:
        status = "disabled" if changes["disabled"] else "enabled"
        if status != row["status"]:
            # Disabled by the merchant: no reason of payonce's. Enabled again: its run of
            # failures starts afresh, so it is not disabled again at once for old ones.
            new.update(status=status, disabled_reason=None, failing_since=None)
    return new


@routes.post("/v1/webhook_endpoints/{id}")
async def update_endpoint(request: web.Request) -> web.Response:
    endpoint_id = request.match_info["id"]
    key = check_key(request.headers.get("Idempotency-Key"))
    changes = params.update_webhook_endpoint(
        await params.read_params(request, lists=params.WEBHOOK_ENDPOINT_LISTS))
    fp = fingerprint("POST", f"/v1/webhook_endpoints/{endpoint_id}", changes)
    settings = request.app[SETTINGS]
    account_id = request[ACCOUNT_ID]

    async def execute() -> Outcome:
        if not ENDPOINT_ID.fullmatch(endpoint_id):
            raise no_such_endpoint(endpoint_id)
        if "url" in changes:
            await deliverable(changes["url"], settings)
        async with request.app[DB].acquire() as conn, conn.transaction():
            row = await conn.fetchrow(LOCK_ENDPOINT, endpoint_id, account_id)
            if row is None:
                raise no_such_endpoint(endpoint_id)
            new = updated(row, changes)
            row = await conn.fetchrow(
                UPDATE_ENDPOINT, endpoint_id, account_id, new["url"], new["enabled_events"],
                new["description"], new["metadata"], new["status"], new["disabled_reason"],
                new["failing_since"])
        log.info("webhook endpoint updated", extra={"ids": {"changed": ",".join(changes)}})
        return Outcome(200, orjson.dumps(objects.webhook_endpoint(row)))

    with bound(webhook_endpoint=endpoint_id):
        return await idempotent(request, key, fp, execute)


@routes.delete("/v1/webhook_endpoints/{id}")
async def delete_endpoint(request: web.Request) -> web.Response:
    """Soft delete: the row stays for its deliveries and attempts; the endpoint answers 404
    from now on and receives nothing more. A DELETE needs no Idempotency-Key (keys are for
    POSTs); a second one is a 404, as at Stripe."""
    endpoint_id = request.match_info["id"]
    params.validate(params.read_query(request), {})
    row = None
    if ENDPOINT_ID.fullmatch(endpoint_id):
        row = await request.app[DB].fetchrow(DELETE_ENDPOINT, endpoint_id, request[ACCOUNT_ID])
    if row is None:
        raise no_such_endpoint(endpoint_id)
    with bound(webhook_endpoint=endpoint_id):
        log.info("webhook endpoint deleted")
    return json_response(objects.deleted("webhook_endpoint", endpoint_id))


@routes.get("/v1/webhook_endpoints/{id}/deliveries")
async def list_attempts(request: web.Request) -> web.Response:
    """The attempts to deliver events to this endpoint, newest first; `event=evt_…` keeps
    one event's."""
    endpoint_id = request.match_info["id"]
    values = params.validate(params.read_query(request), LIST_ATTEMPTS)
    await fetch_endpoint(request, endpoint_id)
    where = lists.Where(endpoint_id, request[ACCOUNT_ID])
    if values["event"] is not None:
        where.add("d.event_id = {}", values["event"])
    rows, has_more = await lists.page(request.app[DB], ATTEMPTS, where, values)
    return json_response(lists.envelope(
        f"/v1/webhook_endpoints/{endpoint_id}/deliveries",
        [objects.webhook_delivery_attempt(r) for r in rows], has_more))
