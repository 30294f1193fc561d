"""The Events API: a payment's events in order, keyset pages over hundreds of events with both
cursors, every filter, accounts kept apart, and stripe-python's list and retrieve against it."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe

from contracts import ids
from contracts.objects import API_VERSION
from tests import stripe_schema
from tests.conftest import Client, Reply, Stack, form
from tests.support import EXPECTED_EVENTS, VISA

# Events made here name an exchange no relay or dispatcher serves, and leave the outbox at once:
# nothing but these tests ever reads them.
EXCHANGE = "payonce_test.events_api"
# Stripe's Event fields (stripe-python's Event class); `account` and `context` only for Connect.
EVENT_FIELDS = {"id", "object", "account", "api_version", "context", "created", "data",
                "livemode", "pending_webhooks", "request", "type"}
ERROR_KEYS = {"type", "code", "decline_code", "message", "param", "doc_url"}

INSERT_EVENTS = """
INSERT INTO events (id, account_id, type, object_id, data, request_id, idempotency_key,
                    exchange, created)
SELECT t.id, $1, t.type, t.object_id,
       jsonb_build_object('id', t.object_id, 'object', split_part(t.type, '.', 1)),
       'req_' || t.n, 'key-' || t.n, $2, t.created
FROM unnest($3::text[], $4::text[], $5::text[], $6::timestamptz[])
     WITH ORDINALITY AS t(id, type, object_id, created, n)
ORDER BY t.n
"""


async def insert_events(db: Any, account_id: str, types: list[str],
                        created: list[datetime] | None = None) -> list[str]:
    """Events of these types for the account, written in this order (oldest first), one
    second apart unless `created` says when; their ids."""
    start = datetime.now(UTC) - timedelta(seconds=len(types) + 5)
    when = created or [start + timedelta(seconds=i) for i in range(len(types))]
    event_ids = [ids.random_id("evt") for _ in types]
    objects = [ids.random_id("pi") for _ in types]
    async with db.acquire() as conn, conn.transaction():
        await conn.execute(INSERT_EVENTS, account_id, EXCHANGE, event_ids, types, objects, when)
        await conn.execute("DELETE FROM events_outbox WHERE exchange = $1", EXCHANGE)
    return event_ids


def assert_error(reply: Reply, status: int, code: str | None, param: str | None,
                 type_: str = "invalid_request_error") -> None:
    assert reply.status == status, reply.body
    error = reply.error
    assert set(error) <= ERROR_KEYS and None not in error.values(), error
    assert (error["type"], error.get("code"), error.get("param")) == (type_, code, param), error
    assert error["message"]


async def listed(api: Client, query: str) -> list[str]:
    """The ids of one page of /v1/events?query."""
    reply = await api.get(f"/v1/events?{query}")
    assert reply.status == 200, reply.body
    return [e["id"] for e in reply.body["data"]]


async def walk(api: Client, query: str, cursor: str, start: str | None = None
               ) -> tuple[list[str], list[int]]:
    """Every id from walking pages with `cursor` (starting_after or ending_before) in the
    order the pages come, newest first within each; and each page's size."""
    seen: list[str] = []
    sizes: list[int] = []
    position = start
    while True:
        suffix = f"&{cursor}={position}" if position else ""
        reply = await api.get(f"/v1/events?{query}{suffix}")
        assert reply.status == 200, reply.body
        page = [e["id"] for e in reply.body["data"]]
        sizes.append(len(page))
        seen.extend(page if cursor == "starting_after" else reversed(page))
        if not reply.body["has_more"]:
            return seen, sizes
        position = page[-1] if cursor == "starting_after" else page[0]


# ---- a payment's life -----------------------------------------------------------------------

async def test_every_event_of_a_payment_is_listed_in_order(api: Client, shared: Stack) -> None:
    key = f"order-{uuid.uuid4()}"
    created = await api.post("/v1/payment_intents", form({
        "amount": 2000, "currency": "usd", "payment_method": VISA, "confirm": True}), key=key)
    assert created.status == 202, created.body
    intent = await api.wait_for(created.body["id"], ["succeeded"])
    expected = EXPECTED_EVENTS[VISA]
    deadline = time.monotonic() + 10
    while len(page := (await api.get("/v1/events?limit=100")).body["data"]) < len(expected):
        assert time.monotonic() < deadline, page
        await asyncio.sleep(0.05)

    reply = await api.get("/v1/events?limit=100")
    assert reply.status == 200
    assert set(reply.body) == {"object", "url", "has_more", "data"}
    assert (reply.body["object"], reply.body["url"], reply.body["has_more"]) == \
        ("list", "/v1/events", False)
    events = list(reversed(reply.body["data"]))
    assert [e["type"] for e in events] == expected
    rows = await api.db.fetch("SELECT id FROM events WHERE account_id = $1 ORDER BY seq",
                              api.account_id)
    assert [e["id"] for e in events] == [r["id"] for r in rows]
    assert [e["created"] for e in events] == sorted(e["created"] for e in events)

    for event in events:
        assert set(event) <= EVENT_FIELDS, set(event) - EVENT_FIELDS
        assert event["object"] == "event" and event["id"].startswith("evt_")
        assert event["api_version"] == API_VERSION and event["livemode"] is False
        assert event["pending_webhooks"] == 0
        assert isinstance(event["created"], int)
        # The request that caused it; the PSP's answer came in no request with a key.
        assert event["request"]["id"] == created.headers["Request-Id"]
        caused_by_psp = event["type"].startswith("charge.") or event is events[-1]
        assert event["request"]["idempotency_key"] == (None if caused_by_psp else key)
        obj = event["data"]["object"]
        stripe_schema.check(obj["object"], obj)
        assert obj["id"] in (intent["id"], intent["latest_charge"])
        one = await api.get(f"/v1/events/{event['id']}")
        assert one.status == 200 and one.body == event
    assert events[-1]["data"]["object"] == intent
    # Each step's event names what changed, as Stripe's do.
    assert events[-1]["data"]["previous_attributes"]["status"] == "processing"


# ---- pages ----------------------------------------------------------------------------------

async def test_pages_over_hundreds_of_events_with_both_cursors(api: Client) -> None:
    inserted = await insert_events(api.db, api.account_id, ["payment_intent.created"] * 257)
    newest_first = list(reversed(inserted))

    first = await api.get("/v1/events")
    assert [e["id"] for e in first.body["data"]] == newest_first[:10]
    assert first.body["has_more"] is True

    forward, sizes = await walk(api, "limit=100", "starting_after")
    assert forward == newest_first
    assert sizes == [100, 100, 57]

    # Back from the oldest: every newer event, each page the one just newer than the last.
    backward, sizes = await walk(api, "limit=100", "ending_before", start=inserted[0])
    assert backward == inserted[1:]
    assert sizes == [100, 100, 56]
    page = await api.get(f"/v1/events?limit=3&ending_before={inserted[10]}")
    assert [e["id"] for e in page.body["data"]] == [inserted[13], inserted[12], inserted[11]]
    assert page.body["has_more"] is True
    assert (await api.get(f"/v1/events?ending_before={inserted[-1]}")).body == {
        "object": "list", "url": "/v1/events", "has_more": False, "data": []}
    assert (await api.get(f"/v1/events?starting_after={inserted[0]}")).body["data"] == []

    for limit in (1, 100):
        assert len(await listed(api, f"limit={limit}")) == limit


async def test_a_cursor_keeps_its_place_while_events_arrive(api: Client) -> None:
    inserted = await insert_events(api.db, api.account_id, ["charge.succeeded"] * 30)
    page = await listed(api, "limit=10")
    newer = await insert_events(api.db, api.account_id, ["charge.succeeded"] * 5)
    rest = await listed(api, f"limit=100&starting_after={page[-1]}")
    assert page + rest == list(reversed(inserted))
    assert await listed(api, f"limit=100&ending_before={page[0]}") == list(reversed(newer))


@pytest.mark.parametrize(("query", "code", "param"), [
    ("limit=0", "parameter_invalid_integer", "limit"),
    ("limit=101", "parameter_invalid_integer", "limit"),
    ("limit=-1", "parameter_invalid_integer", "limit"),
    ("limit=ten", "parameter_invalid_integer", "limit"),
    ("limit=" + "9" * 5000, "parameter_invalid_integer", "limit"),
    ("limit[0]=1", "parameter_invalid_integer", "limit"),
    ("starting_after=evt_" + "a" * 24, "resource_missing", "starting_after"),
    ("ending_before=evt_" + "a" * 24, "resource_missing", "ending_before"),
    ("starting_after=pi_123", "resource_missing", "starting_after"),
    ("starting_after=" + "x" * 5001, "parameter_invalid", "starting_after"),
    ("starting_after=%00", "parameter_invalid", "starting_after"),
    ("created=soon", "parameter_invalid_integer", "created"),
    ("created[gt]=1.5", "parameter_invalid_integer", "created[gt]"),
    ("created[after]=1", "parameter_unknown", "created[after]"),
    ("type=a&types[0]=b", "invalid_request", "types"),
    ("types=charge.succeeded", "parameter_invalid", "types"),
    ("types[0]=a&types[2]=b", "parameter_invalid", "types"),
    ("delivery_success=maybe", "parameter_invalid_boolean", "delivery_success"),
    ("expand[0]=data", "parameter_unknown", "expand"),
    ("metadata[x]=1", "parameter_unknown", "metadata"),
    ("types[]=a&types[0]=b", "invalid_request", "types[0]"),
    ("limit=1&limit=2", "invalid_request", "limit"),
    ("%ff=1", "invalid_request", None),
    ("limit", "invalid_request", None),
], ids=lambda v: str(v)[:40])
async def test_bad_list_parameters_are_a_clear_400(api: Client, query: str, code: str,
                                                   param: str | None) -> None:
    await insert_events(api.db, api.account_id, ["payment_intent.created"] * 2)
    assert_error(await api.get(f"/v1/events?{query}"), 400, code, param)


async def test_both_cursors_at_once_is_a_400(api: Client) -> None:
    first, second = await insert_events(api.db, api.account_id, ["charge.failed"] * 2)
    assert_error(await api.get(f"/v1/events?starting_after={second}&ending_before={first}"),
                 400, "invalid_request", "ending_before")


# ---- filters --------------------------------------------------------------------------------

TYPES = ["payment_intent.created", "payment_intent.processing", "charge.succeeded",
         "payment_intent.succeeded", "charge.failed", "payment_intent.payment_failed",
         # `_` is literal in a type pattern: payment_intent.* does not match this one.
         "paymentxintent.created"]


async def test_type_filters(api: Client) -> None:
    inserted = dict(zip(await insert_events(api.db, api.account_id, TYPES), TYPES, strict=True))

    async def types_of(query: str) -> list[str]:
        return [inserted[i] for i in reversed(await listed(api, query))]

    assert await types_of("type=charge.succeeded") == ["charge.succeeded"]
    assert await types_of("type=payment_intent.*") == [
        "payment_intent.created", "payment_intent.processing", "payment_intent.succeeded",
        "payment_intent.payment_failed"]
    assert await types_of("type=*.succeeded") == ["charge.succeeded", "payment_intent.succeeded"]
    assert await types_of("type=*") == TYPES
    assert await types_of("type=charge.%2A") == ["charge.succeeded", "charge.failed"]
    assert await types_of("type=payment%25") == []
    assert await types_of("type=no.such") == []
    assert await types_of("types[0]=charge.failed&types[1]=payment_intent.created") == [
        "payment_intent.created", "charge.failed"]
    # curl's way to send a list.
    assert await types_of("types[]=charge.failed&types[]=charge.succeeded") == [
        "charge.succeeded", "charge.failed"]
    # Filters and cursors together: the next page of the same filter.
    page = await listed(api, "type=payment_intent.*&limit=2")
    assert [inserted[i] for i in page] == ["payment_intent.payment_failed",
                                           "payment_intent.succeeded"]
    assert await types_of(f"type=payment_intent.*&starting_after={page[-1]}") == [
        "payment_intent.created", "payment_intent.processing"]


async def test_created_filters(api: Client) -> None:
    base = 1_700_000_000
    seconds = [base, base + 0.4, base + 1, base + 2.9, base + 3]
    when = [datetime.fromtimestamp(s, UTC) for s in seconds]
    inserted = await insert_events(api.db, api.account_id, ["charge.succeeded"] * 5, when)

    async def at(query: str) -> list[int]:
        return sorted(inserted.index(i) for i in await listed(api, query))

    assert await at(f"created={base}") == [0, 1]
    assert await at(f"created[gt]={base}") == [2, 3, 4]
    assert await at(f"created[gte]={base + 1}") == [2, 3, 4]
    assert await at(f"created[lt]={base + 2}") == [0, 1, 2]
    assert await at(f"created[lte]={base + 2}") == [0, 1, 2, 3]
    assert await at(f"created[gt]={base}&created[lt]={base + 3}") == [2, 3]
    assert await at(f"created[gte]={base + 3}&created[lte]={base + 3}") == [4]
    assert await at(f"created[gte]={base + 4}") == []
    # Far outside any date: no overflow, the same answer as the nearest date.
    assert await at("created[gt]=" + "9" * 40) == []
    assert await at("created[gt]=-" + "9" * 40) == [0, 1, 2, 3, 4]
    assert await at("created[lt]=99999999999999") == [0, 1, 2, 3, 4]
    # The rendered `created` is the second the filters count.
    body = (await api.get(f"/v1/events/{inserted[1]}")).body
    assert body["created"] == base


async def test_delivery_success_filter_and_pending_webhooks(api: Client) -> None:
    done, pending, failed, none = await insert_events(api.db, api.account_id,
                                                      ["charge.succeeded"] * 4)
    endpoint = await api.post("/v1/webhook_endpoints", {"url": "https://example.com/hook",
                                                        "enabled_events[0]": "*"})
    assert endpoint.status == 200, endpoint.body
    endpoint_id = endpoint.body["id"]
    for event_id, state in ((done, "succeeded"), (pending, "pending"), (failed, "failed")):
        await api.db.execute(
            """INSERT INTO webhook_deliveries (id, account_id, endpoint_id, event_id, object_id,
                                               event_seq, exchange, state, next_attempt_at)
               SELECT $1, account_id, $2, id, object_id, seq, exchange, $3::text,
                      CASE WHEN $3::text = 'pending' THEN now() + interval '1 hour' END
               FROM events WHERE id = $4""",
            ids.random_id("whd"), endpoint_id, state, event_id)
    assert sorted(await listed(api, "delivery_success=true")) == sorted([done, none])
    assert sorted(await listed(api, "delivery_success=false")) == sorted([pending, failed])
    counts = {e["id"]: e["pending_webhooks"] for e in
              (await api.get("/v1/events")).body["data"]}
    assert counts == {done: 0, pending: 1, failed: 0, none: 0}
    # A deleted endpoint receives nothing more: nothing is pending for it.
    assert (await api.request("DELETE", f"/v1/webhook_endpoints/{endpoint_id}")).status == 200
    assert (await api.get(f"/v1/events/{pending}")).body["pending_webhooks"] == 0


# ---- accounts -------------------------------------------------------------------------------

async def test_accounts_see_only_their_own_events(api: Client, shared: Stack) -> None:
    other = await shared.client()
    mine = await insert_events(api.db, api.account_id, ["charge.succeeded"] * 3)
    theirs = await insert_events(api.db, other.account_id, ["charge.succeeded"] * 3)
    assert await listed(api, "limit=100") == list(reversed(mine))
    assert await listed(other, "limit=100") == list(reversed(theirs))
    for event_id in theirs:
        assert_error(await api.get(f"/v1/events/{event_id}"), 404, "resource_missing", "id")
    for cursor in ("starting_after", "ending_before"):
        assert_error(await api.get(f"/v1/events?{cursor}={theirs[1]}"), 400,
                     "resource_missing", cursor)
    for bad in ("evt_" + "a" * 24, "evt_short", "pi_123", "%00"):
        assert_error(await api.get(f"/v1/events/{bad}"), 404, "resource_missing", "id")
    assert_error(await api.get(f"/v1/events/{mine[0]}?limit=1"), 400, "parameter_unknown",
                 "limit")
    assert_error(await api.get("/v1/events", auth=None), 401, "api_key_missing", None)


# ---- stripe-python --------------------------------------------------------------------------

def sdk(base: str, key: str) -> Any:
    return stripe.StripeClient(key, base_addresses={"api": base}, max_network_retries=2).v1


def official_library(base: str, key: str, inserted: list[str], marks: list[int]) -> None:
    client = sdk(base, key)
    every = [e.id for e in client.events.list(params={"limit": 7}).auto_paging_iter()]
    assert every == list(reversed(inserted))
    # Back from the oldest: the library walks with ending_before and yields oldest first.
    back = client.events.list(params={"limit": 9, "ending_before": inserted[0]})
    assert [e.id for e in back.auto_paging_iter()] == inserted[1:]

    charges = client.events.list(params={"type": "charge.*", "limit": 4})
    assert {e.type for e in charges.auto_paging_iter()} == {"charge.succeeded"}
    both = client.events.list(params={"types": ["charge.succeeded", "payment_intent.created"],
                                      "created": {"gte": marks[0], "lt": marks[1]}})
    assert [e.id for e in both.auto_paging_iter()] == list(reversed(inserted[:10]))

    event = client.events.retrieve(inserted[3])
    assert isinstance(event, stripe.Event)
    assert (event.id, event.object, event.type, event.livemode) == \
        (inserted[3], "event", "charge.succeeded", False)
    assert event.data.object["id"].startswith("pi_")
    assert event.request.idempotency_key == "key-4"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.events.retrieve("evt_" + "b" * 24)
    assert missing.value.http_status == 404 and missing.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError) as bad_cursor:
        client.events.list(params={"starting_after": "evt_" + "b" * 24})
    assert bad_cursor.value.http_status == 400 and bad_cursor.value.param == "starting_after"


async def test_official_library_lists_and_retrieves_events(api: Client, shared: Stack) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    when = [start + timedelta(seconds=i) for i in range(40)]
    types = ["payment_intent.created", "charge.succeeded"] * 20
    inserted = await insert_events(api.db, api.account_id, types, when)
    marks = [int(start.timestamp()), int(start.timestamp()) + 10]
    await asyncio.to_thread(official_library, shared.base_url.rstrip("/"), api.secret_key,
                            inserted, marks)
