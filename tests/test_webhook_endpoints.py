"""Webhook endpoints: create (200 with the secret, once), read, list, update, delete; clear
400s that change nothing; idempotent creates, also once Redis forgot them; private addresses
refused unless allowed; accounts kept apart; the attempts made to deliver to an endpoint, and
redelivering an event to it on demand."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import stripe

from contracts import ids
from contracts.objects import API_VERSION
from tests.conftest import Client, Reply, Stack, make_settings, stack
from tests.test_events_api import EXCHANGE, assert_error, insert_events

URL = "https://example.com/payonce/hooks"
SECRET = make_settings().secret_bytes
# stripe-python's WebhookEndpoint fields; `deleted` only in the answer to a DELETE.
ENDPOINT_FIELDS = {"id", "object", "api_version", "application", "created", "description",
                   "enabled_events", "livemode", "metadata", "secret", "status", "url"}
ATTEMPT_FIELDS = {"id", "object", "attempt", "created", "delivery", "error", "event",
                  "latency_ms", "livemode", "next_attempt_at", "state", "status_code",
                  "webhook_endpoint"}


async def create(api: Client, key: str | None = "auto", **kw: Any) -> Reply:
    """An endpoint for payment_intent.succeeded and charge.failed, or as `kw` say (None
    leaves a parameter out)."""
    data = {"url": URL, "enabled_events[0]": "payment_intent.succeeded",
            "enabled_events[1]": "charge.failed", **kw}
    return await api.post("/v1/webhook_endpoints", {k: v for k, v in data.items()
                                                     if v is not None}, key=key)


async def endpoints_of(api: Client) -> int:
    return int(await api.db.fetchval(
        "SELECT count(*) FROM webhook_endpoints WHERE account_id = $1", api.account_id))


async def delete(api: Client, endpoint_id: str) -> Reply:
    return await api.request("DELETE", f"/v1/webhook_endpoints/{endpoint_id}")


# ---- create, read, list, update, delete -----------------------------------------------------

async def test_create_read_update_delete(api: Client, shared: Stack) -> None:
    key = str(uuid.uuid4())
    created = await api.post("/v1/webhook_endpoints", {
        "url": URL, "enabled_events[0]": "payment_intent.succeeded",
        "enabled_events[1]": "charge.failed", "enabled_events[2]": "charge.failed",
        "description": "orders", "metadata[team]": "payments", "metadata[tier]": "1"}, key=key)
    assert created.status == 200, created.body
    endpoint = created.body
    secret = shared.settings.secret_bytes
    assert endpoint["id"] == ids.webhook_endpoint_id(secret, api.account_id, key)
    assert endpoint["secret"] == ids.webhook_secret(secret, endpoint["id"])
    assert endpoint["secret"].startswith("whsec_")
    assert set(endpoint) == ENDPOINT_FIELDS
    assert {k: endpoint[k] for k in ("object", "url", "enabled_events", "description",
                                     "metadata", "status", "livemode", "api_version",
                                     "application")} == {
        "object": "webhook_endpoint", "url": URL,
        "enabled_events": ["payment_intent.succeeded", "charge.failed"],
        "description": "orders", "metadata": {"team": "payments", "tier": "1"},
        "status": "enabled", "livemode": False, "api_version": API_VERSION,
        "application": None}
    assert isinstance(endpoint["created"], int)
    shown = {k: v for k, v in endpoint.items() if k != "secret"}

    # The secret is in the answer to the create only.
    read = await api.get(f"/v1/webhook_endpoints/{endpoint['id']}")
    assert read.status == 200 and read.body == shown

    path = f"/v1/webhook_endpoints/{endpoint['id']}"
    changed = await api.post(path, {
        "url": "https://example.org/new", "enabled_events[0]": "*", "description": "",
        "metadata[team]": "", "metadata[region]": "eu"})
    assert changed.status == 200, changed.body
    assert "secret" not in changed.body
    assert {k: changed.body[k] for k in ("url", "enabled_events", "description", "metadata",
                                         "status", "created", "id")} == {
        "url": "https://example.org/new", "enabled_events": ["*"], "description": None,
        "metadata": {"tier": "1", "region": "eu"}, "status": "enabled",
        "created": endpoint["created"], "id": endpoint["id"]}
    # A parameter not sent is left as it is.
    same = await api.post(path, {"description": "kept"})
    assert same.body["url"] == "https://example.org/new"
    assert same.body["metadata"] == {"tier": "1", "region": "eu"}
    assert same.body["description"] == "kept"
    cleared = await api.post(path, {"metadata": ""})
    assert cleared.body["metadata"] == {}

    disabled = await api.post(path, {"disabled": "true"})
    assert disabled.status == 200 and disabled.body["status"] == "disabled"
    enabled = await api.post(path, {"disabled": "false"})
    assert enabled.body["status"] == "enabled"
    assert (await api.get(path)).body == enabled.body

    gone = await delete(api, endpoint["id"])
    assert gone.status == 200
    assert gone.body == {"id": endpoint["id"], "object": "webhook_endpoint", "deleted": True}
    for reply in (await api.get(path), await delete(api, endpoint["id"]),
                  await api.post(path, {"description": "x"}),
                  await api.get(f"{path}/deliveries")):
        assert_error(reply, 404, "resource_missing", "webhook_endpoint")
    assert (await api.get("/v1/webhook_endpoints")).body["data"] == []
    # Kept for its deliveries' sake.
    assert await api.db.fetchval("SELECT deleted_at IS NOT NULL FROM webhook_endpoints "
                                 "WHERE id = $1", endpoint["id"])


async def test_json_bodies_and_curl_lists(api: Client) -> None:
    by_json = await api.post("/v1/webhook_endpoints", json={
        "url": URL, "enabled_events": ["charge.succeeded", "webhook_endpoint.disabled"],
        "metadata": {"n": 1}})
    assert by_json.status == 200, by_json.body
    assert by_json.body["enabled_events"] == ["charge.succeeded", "webhook_endpoint.disabled"]
    assert by_json.body["metadata"] == {"n": "1"}
    by_curl = await api.post("/v1/webhook_endpoints", body=(
        f"url={URL}&enabled_events[]=charge.succeeded&enabled_events[]=charge.failed").encode(),
        content_type="application/x-www-form-urlencoded")
    assert by_curl.status == 200, by_curl.body
    assert by_curl.body["enabled_events"] == ["charge.succeeded", "charge.failed"]
    updated = await api.post(f"/v1/webhook_endpoints/{by_curl.body['id']}", json={
        "enabled_events": ["*"], "disabled": True, "metadata": {"a": "b"}})
    assert updated.status == 200, updated.body
    assert (updated.body["enabled_events"], updated.body["status"], updated.body["metadata"]) \
        == (["*"], "disabled", {"a": "b"})


async def test_list_newest_first_with_both_cursors(api: Client) -> None:
    made = [(await create(api, description=str(i))).body["id"] for i in range(5)]
    newest_first = list(reversed(made))
    everything = await api.get("/v1/webhook_endpoints")
    assert everything.status == 200
    assert (everything.body["object"], everything.body["url"], everything.body["has_more"]) \
        == ("list", "/v1/webhook_endpoints", False)
    assert [e["id"] for e in everything.body["data"]] == newest_first
    assert all("secret" not in e for e in everything.body["data"])

    first = await api.get("/v1/webhook_endpoints?limit=2")
    assert [e["id"] for e in first.body["data"]] == newest_first[:2]
    assert first.body["has_more"] is True
    second = await api.get(f"/v1/webhook_endpoints?limit=2&starting_after={newest_first[1]}")
    assert [e["id"] for e in second.body["data"]] == newest_first[2:4]
    last = await api.get(f"/v1/webhook_endpoints?limit=2&starting_after={newest_first[3]}")
    assert [e["id"] for e in last.body["data"]] == newest_first[4:]
    assert last.body["has_more"] is False
    back = await api.get(f"/v1/webhook_endpoints?limit=2&ending_before={newest_first[3]}")
    assert [e["id"] for e in back.body["data"]] == newest_first[1:3]
    assert back.body["has_more"] is True

    assert (await delete(api, made[2])).status == 200
    assert [e["id"] for e in (await api.get("/v1/webhook_endpoints")).body["data"]] == \
        [i for i in newest_first if i != made[2]]
    assert_error(await api.get(f"/v1/webhook_endpoints?starting_after={made[2]}"), 400,
                 "resource_missing", "starting_after")
    assert_error(await api.get("/v1/webhook_endpoints?created[gt]=1"), 400,
                 "parameter_unknown", "created")


# ---- bad requests change nothing ------------------------------------------------------------

LONG_URL = "https://example.com/" + "a" * 2100


@pytest.mark.parametrize(("data", "code", "param"), [
    ({"url": None}, "parameter_missing", "url"),
    ({"url": ""}, "parameter_missing", "url"),
    ({"enabled_events[0]": None, "enabled_events[1]": None}, "parameter_missing",
     "enabled_events"),
    ({"url": "not a url"}, "url_invalid", "url"),
    ({"url": "example.com/hooks"}, "url_invalid", "url"),
    ({"url": "ftp://example.com/hooks"}, "url_invalid", "url"),
    ({"url": "javascript:alert(1)"}, "url_invalid", "url"),
    ({"url": "https://"}, "url_invalid", "url"),
    ({"url": "https://user:secret@example.com/"}, "url_invalid", "url"),
    ({"url": "https://example.com:99999/"}, "url_invalid", "url"),
    ({"url": "https://exa mple.com/"}, "url_invalid", "url"),
    ({"url": "https://example.com/\x00"}, "url_invalid", "url"),
    ({"url": LONG_URL}, "url_invalid", "url"),
    ({"url[0]": URL, "url": None}, "parameter_invalid", "url"),
    ({"enabled_events[1]": "charge.dispute.created"}, "parameter_invalid", "enabled_events"),
    ({"enabled_events[0]": "everything", "enabled_events[1]": None}, "parameter_invalid",
     "enabled_events"),
    ({"enabled_events[0]": None, "enabled_events[1]": None, "enabled_events": "*"},
     "parameter_invalid", "enabled_events"),
    ({"enabled_events[1]": None, "enabled_events[2]": "charge.failed"}, "parameter_invalid",
     "enabled_events"),
    ({"enabled_events[2]": "x" * 101}, "parameter_invalid", "enabled_events[2]"),
    ({"description": "d" * 5001}, "parameter_invalid", "description"),
    ({"metadata": "team"}, "parameter_invalid", "metadata"),
    ({"metadata[k]": "v" * 501}, "parameter_invalid", "metadata[k]"),
    ({"api_version": "2020-08-27"}, "parameter_unknown", "api_version"),
    ({"enabled_events[]": "*"}, "invalid_request", "enabled_events[]"),
], ids=lambda v: str(v)[:40])
async def test_bad_creates_are_a_clear_400_that_changes_nothing(
    api: Client, shared: Stack, data: dict[str, Any], code: str, param: str
) -> None:
    key = str(uuid.uuid4())
    assert_error(await create(api, **data, key=key), 400, code, param)
    assert await endpoints_of(api) == 0
    # Not stored: the key still works for a good request.
    assert (await create(api, key=key)).status == 200
    assert await endpoints_of(api) == 1


async def test_unknown_event_types_are_all_named(api: Client) -> None:
    reply = await api.post("/v1/webhook_endpoints", json={
        "url": URL, "enabled_events": ["charge.dispute.created", "*", "invoice.paid"]})
    assert_error(reply, 400, "parameter_invalid", "enabled_events")
    assert "'charge.dispute.created'" in reply.error["message"]
    assert "'invoice.paid'" in reply.error["message"]
    assert "payment_intent.succeeded" in reply.error["message"]
    for empty in ([], ""):
        assert_error(await api.post("/v1/webhook_endpoints", json={
            "url": URL, "enabled_events": empty}), 400,
            "parameter_invalid" if empty == [] else "parameter_missing", "enabled_events")
    assert await endpoints_of(api) == 0


async def test_bad_updates_change_nothing(api: Client) -> None:
    endpoint = (await create(api, **{"metadata[a]": "1"})).body
    path = f"/v1/webhook_endpoints/{endpoint['id']}"
    for data, code, param in [
        ({"url": "ftp://example.com/"}, "url_invalid", "url"),
        ({"url": ""}, "parameter_invalid", "url"),
        ({"enabled_events[0]": "nope"}, "parameter_invalid", "enabled_events"),
        ({"enabled_events": ""}, "parameter_invalid", "enabled_events"),
        ({"disabled": "maybe"}, "parameter_invalid_boolean", "disabled"),
        ({"secret": "whsec_mine"}, "parameter_unknown", "secret"),
        ({f"metadata[k{i}]": "v" for i in range(50)}, "parameter_invalid", "metadata"),
    ]:
        assert_error(await api.post(path, data), 400, code, param)
    assert (await api.get(path)).body == {k: v for k, v in endpoint.items() if k != "secret"}
    assert_error(await api.post(path, {"description": "x"}, key=None), 400, "parameter_missing",
                 "Idempotency-Key")
    assert_error(await api.post("/v1/webhook_endpoints/we_nope", {"description": "x"}), 404,
                 "resource_missing", "webhook_endpoint")


async def test_every_post_needs_an_idempotency_key(api: Client) -> None:
    assert_error(await create(api, key=None), 400, "parameter_missing", "Idempotency-Key")
    assert await endpoints_of(api) == 0


# ---- idempotency ----------------------------------------------------------------------------

async def test_a_create_is_idempotent_also_after_redis_forgot_it(api: Client,
                                                                 shared: Stack) -> None:
    key = str(uuid.uuid4())
    first = await create(api, key=key)
    again = await create(api, key=key)
    assert first.status == again.status == 200
    assert again.body == first.body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert_error(await create(api, key=key, description="other"), 400, "idempotency_key_reused",
                 "Idempotency-Key", type_="idempotency_error")

    # Redis lost the answer: Postgres still has the endpoint and the create's fingerprint.
    await shared.redis.delete(f"idem:{api.account_id}:{key}")
    replayed = await create(api, key=key)
    assert replayed.status == 200 and replayed.body == first.body
    assert replayed.headers["Idempotent-Replayed"] == "true"
    await shared.redis.delete(f"idem:{api.account_id}:{key}")
    assert_error(await create(api, key=key, description="other"), 400, "idempotency_key_reused",
                 "Idempotency-Key", type_="idempotency_error")
    assert await endpoints_of(api) == 1

    # An update is idempotent too: the stored answer, not a second update.
    update_key = str(uuid.uuid4())
    path = f"/v1/webhook_endpoints/{first.body['id']}"
    once = await api.post(path, {"metadata[n]": "1"}, key=update_key)
    await api.post(path, {"metadata[n]": "2"})
    twice = await api.post(path, {"metadata[n]": "1"}, key=update_key)
    assert twice.body == once.body and twice.headers["Idempotent-Replayed"] == "true"
    assert (await api.get(path)).body["metadata"] == {"n": "2"}


# ---- where a URL may point ------------------------------------------------------------------

PRIVATE = ["http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.1.2.3/hook",
           "http://192.168.0.10/hook", "http://172.16.5.4/hook", "http://169.254.169.254/latest",
           "http://[::1]/hook", "http://[::ffff:127.0.0.1]/hook", "http://0.0.0.0/hook",
           "http://[fe80::1]/hook", "http://224.0.0.1/hook", "http://100.64.0.1/hook"]


async def test_private_addresses_are_refused_unless_allowed(migrated: None) -> None:
    async with stack(make_settings(webhook_allow_private=False), processor=False) as s:
        api = await s.client()
        for url in PRIVATE:
            reply = await create(api, url=url)
            assert_error(reply, 400, "url_invalid", "url")
            assert "public addresses" in reply.error["message"], reply.error
        # A public address is fine; a name that does not resolve is refused.
        public = await create(api, url="https://93.184.215.14/hook")
        assert public.status == 200, public.body
        assert_error(await create(api, url="https://no-such-host.invalid/hook"), 400,
                     "url_invalid", "url")
        path = f"/v1/webhook_endpoints/{public.body['id']}"
        assert_error(await api.post(path, {"url": "http://10.0.0.1/"}), 400, "url_invalid", "url")
        assert (await api.get(path)).body["url"] == "https://93.184.215.14/hook"
        assert await endpoints_of(api) == 1


async def test_private_addresses_are_allowed_when_the_settings_say_so(api: Client) -> None:
    for url in ("http://127.0.0.1:4242/webhook", "http://localhost:4242/webhook"):
        assert (await create(api, url=url)).status == 200


# ---- accounts -------------------------------------------------------------------------------

async def test_accounts_see_and_change_only_their_own_endpoints(api: Client,
                                                                shared: Stack) -> None:
    other = await shared.client()
    theirs = (await create(other)).body
    mine = (await create(api)).body
    path = f"/v1/webhook_endpoints/{theirs['id']}"
    for reply in (await api.get(path), await api.post(path, {"disabled": "true"}),
                  await delete(api, theirs["id"]), await api.get(f"{path}/deliveries")):
        assert_error(reply, 404, "resource_missing", "webhook_endpoint")
    assert [e["id"] for e in (await api.get("/v1/webhook_endpoints")).body["data"]] == \
        [mine["id"]]
    assert_error(await api.get(f"/v1/webhook_endpoints?starting_after={theirs['id']}"), 400,
                 "resource_missing", "starting_after")
    (event,) = await insert_events(api.db, api.account_id, ["charge.failed"])
    assert_error(await api.post(f"/v1/events/{event}/retry",
                                {"webhook_endpoint": theirs["id"]}), 400,
                 "resource_missing", "webhook_endpoint")
    (their_event,) = await insert_events(other.db, other.account_id, ["charge.failed"])
    assert_error(await api.post(f"/v1/events/{their_event}/retry",
                                {"webhook_endpoint": mine["id"]}), 404, "resource_missing", "id")
    # Theirs is as it was.
    assert (await other.get(path)).body == {k: v for k, v in theirs.items() if k != "secret"}


# ---- delivery attempts ----------------------------------------------------------------------

INSERT_DELIVERY = """
INSERT INTO webhook_deliveries (id, account_id, endpoint_id, event_id, object_id, event_seq,
                                exchange, state, attempts, next_attempt_at, locked_until)
SELECT $1, account_id, $2, id, object_id, seq, exchange, $4::text, $5, $6, $7
FROM events WHERE id = $3
"""
INSERT_ATTEMPT = """
INSERT INTO webhook_attempts (delivery_id, attempt, created, status_code, latency_ms, error,
                              next_attempt_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""
FETCH_DELIVERY = "SELECT *, now() AS now FROM webhook_deliveries WHERE id = $1"


async def add_delivery(api: Client, endpoint_id: str, event_id: str, state: str,
                       attempts: list[tuple[datetime, int | None, str | None]],
                       due: datetime | None = None, locked_until: datetime | None = None
                       ) -> str:
    """A delivery with its attempts (time, status code, error), as the dispatcher records
    them; its id."""
    delivery_id = ids.webhook_delivery_id(SECRET, endpoint_id, event_id)
    await api.db.execute(INSERT_DELIVERY, delivery_id, endpoint_id, event_id, state,
                         len(attempts), due, locked_until)
    for number, (when, status, error) in enumerate(attempts, 1):
        following = when + timedelta(seconds=5) if number < len(attempts) or due else None
        await api.db.execute(INSERT_ATTEMPT, delivery_id, number, when, status, 10 * number,
                             error, following)
    return delivery_id


async def test_deliveries_lists_every_attempt_newest_first(api: Client) -> None:
    endpoint = (await create(api, **{"enabled_events[0]": "*"})).body
    first, second = await insert_events(api.db, api.account_id, ["charge.failed"] * 2)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    failed_then_ok = await add_delivery(api, endpoint["id"], first, "succeeded", [
        (t0, 500, None), (t0 + timedelta(seconds=5), None, "connection refused"),
        (t0 + timedelta(seconds=65), 200, None)])
    pending = await add_delivery(api, endpoint["id"], second, "pending", [
        (t0 + timedelta(seconds=30), 503, None)], due=t0 + timedelta(hours=1))
    path = f"/v1/webhook_endpoints/{endpoint['id']}/deliveries"

    reply = await api.get(path)
    assert reply.status == 200, reply.body
    assert (reply.body["object"], reply.body["url"], reply.body["has_more"]) == \
        ("list", path, False)
    items = reply.body["data"]
    assert [i["id"] for i in items] == [f"{failed_then_ok}_3", f"{pending}_1",
                                        f"{failed_then_ok}_2", f"{failed_then_ok}_1"]
    assert all(set(i) == ATTEMPT_FIELDS for i in items)
    newest, waiting, refused, oldest = items
    assert newest == {
        "id": f"{failed_then_ok}_3", "object": "webhook_delivery_attempt", "attempt": 3,
        "created": int(t0.timestamp()) + 65, "delivery": failed_then_ok, "error": None,
        "event": first, "latency_ms": 30, "livemode": False, "next_attempt_at": None,
        "state": "succeeded", "status_code": 200, "webhook_endpoint": endpoint["id"]}
    assert (refused["status_code"], refused["error"], refused["next_attempt_at"]) == \
        (None, "connection refused", int(t0.timestamp()) + 10)
    assert (waiting["state"], waiting["status_code"], waiting["next_attempt_at"]) == \
        ("pending", 503, int(t0.timestamp()) + 35)
    assert oldest["state"] == "succeeded"

    # Pages, both ways, and one event's attempts.
    page = await api.get(f"{path}?limit=2")
    assert [i["id"] for i in page.body["data"]] == [newest["id"], waiting["id"]]
    assert page.body["has_more"] is True
    rest = await api.get(f"{path}?limit=2&starting_after={waiting['id']}")
    assert [i["id"] for i in rest.body["data"]] == [refused["id"], oldest["id"]]
    assert rest.body["has_more"] is False
    back = await api.get(f"{path}?limit=2&ending_before={oldest['id']}")
    assert [i["id"] for i in back.body["data"]] == [waiting["id"], refused["id"]]
    assert back.body["has_more"] is True
    only = await api.get(f"{path}?event={second}")
    assert [i["id"] for i in only.body["data"]] == [waiting["id"]]
    assert (await api.get(f"{path}?event=evt_nope")).body["data"] == []
    since = await api.get(f"{path}?created[gte]={int(t0.timestamp()) + 30}")
    assert [i["id"] for i in since.body["data"]] == [newest["id"], waiting["id"]]

    for cursor in (f"{pending}_9", f"{pending}_0", pending, "whd_x_1", f"{pending}_1" + "0" * 12):
        assert_error(await api.get(f"{path}?starting_after={cursor}"), 400, "resource_missing",
                     "starting_after")
    assert_error(await api.get(f"{path}?state=pending"), 400, "parameter_unknown", "state")
    assert (await api.get(f"/v1/webhook_endpoints/{(await create(api)).body['id']}/deliveries"
                          )).body["data"] == []


# ---- redelivery on demand -------------------------------------------------------------------

async def retry(api: Client, event_id: str, endpoint_id: str | None, **kw: Any) -> Reply:
    data = {} if endpoint_id is None else {"webhook_endpoint": endpoint_id}
    return await api.post(f"/v1/events/{event_id}/retry", data, **kw)


async def test_retry_schedules_a_redelivery_now(api: Client, shared: Stack) -> None:
    endpoint = (await create(api, **{"enabled_events[0]": "*"})).body
    failed, fresh, later, leased = await insert_events(api.db, api.account_id,
                                                       ["charge.failed"] * 4)
    t0 = datetime.now(UTC) - timedelta(hours=2)
    given_up = await add_delivery(api, endpoint["id"], failed, "failed", [
        (t0, 500, None), (t0 + timedelta(seconds=5), 502, None)])

    key = str(uuid.uuid4())
    reply = await retry(api, failed, endpoint["id"], key=key)
    assert reply.status == 200, reply.body
    assert reply.body["object"] == "event" and reply.body["id"] == failed
    assert reply.body["pending_webhooks"] == 1
    row = await api.db.fetchrow(FETCH_DELIVERY, given_up)
    assert row["state"] == "pending" and row["next_attempt_at"] <= row["now"]
    # Attempts keep counting: the redelivery is attempt 3.
    assert row["attempts"] == 2 and row["locked_until"] is None
    # The same key: the same answer, nothing done twice.
    again = await retry(api, failed, endpoint["id"], key=key)
    assert again.body == reply.body and again.headers["Idempotent-Replayed"] == "true"
    assert_error(await retry(api, failed, (await create(api)).body["id"], key=key), 400,
                 "idempotency_key_reused", "Idempotency-Key", type_="idempotency_error")

    # Never delivered there yet: a new delivery, from the event's row.
    assert (await retry(api, fresh, endpoint["id"])).status == 200
    delivery_id = ids.webhook_delivery_id(shared.settings.secret_bytes, endpoint["id"], fresh)
    row = await api.db.fetchrow(FETCH_DELIVERY, delivery_id)
    event = await api.db.fetchrow("SELECT * FROM events WHERE id = $1", fresh)
    assert (row["account_id"], row["endpoint_id"], row["event_id"], row["object_id"],
            row["event_seq"], row["exchange"], row["state"], row["attempts"]) == (
        api.account_id, endpoint["id"], fresh, event["object_id"], event["seq"], EXCHANGE,
        "pending", 0)
    assert row["next_attempt_at"] <= row["now"]

    # Due later: due now. Under way (leased): due again now, but the lease is kept, so it is
    # not sent twice at once; the dispatcher's settle sees the due time changed.
    soon = datetime.now(UTC) + timedelta(hours=1)
    waiting = await add_delivery(api, endpoint["id"], later, "pending", [(t0, 500, None)],
                                 due=soon)
    assert (await retry(api, later, endpoint["id"])).status == 200
    row = await api.db.fetchrow(FETCH_DELIVERY, waiting)
    assert row["state"] == "pending" and row["next_attempt_at"] <= row["now"]
    lease = datetime.now(UTC) + timedelta(seconds=30)
    held = await add_delivery(api, endpoint["id"], leased, "pending", [(t0, 500, None)],
                              due=t0, locked_until=lease)
    assert (await retry(api, leased, endpoint["id"])).status == 200
    row = await api.db.fetchrow(FETCH_DELIVERY, held)
    assert t0 < row["next_attempt_at"] <= row["now"] and row["locked_until"] == lease


async def test_retry_refusals_change_nothing(api: Client, shared: Stack) -> None:
    endpoint = (await create(api)).body  # payment_intent.succeeded and charge.failed only
    failed, created = await insert_events(api.db, api.account_id,
                                          ["charge.failed", "payment_intent.created"])
    assert_error(await retry(api, failed, None), 400, "parameter_missing", "webhook_endpoint")
    assert_error(await retry(api, failed, endpoint["id"], key=None), 400, "parameter_missing",
                 "Idempotency-Key")
    for bad in ("we_" + "a" * 24, "we_1", "whsec_x"):
        assert_error(await retry(api, failed, bad), 400, "resource_missing", "webhook_endpoint")
    for bad in ("evt_" + "a" * 24, "evt_1"):
        assert_error(await retry(api, bad, endpoint["id"]), 404, "resource_missing", "id")
    # Not subscribed to the type.
    reply = await retry(api, created, endpoint["id"])
    assert_error(reply, 400, "invalid_request", "webhook_endpoint")
    assert "payment_intent.created" in reply.error["message"]
    # Disabled, then deleted.
    path = f"/v1/webhook_endpoints/{endpoint['id']}"
    await api.post(path, {"disabled": "true"})
    assert_error(await retry(api, failed, endpoint["id"]), 400, "invalid_request",
                 "webhook_endpoint")
    assert (await delete(api, endpoint["id"])).status == 200
    assert_error(await retry(api, failed, endpoint["id"]), 400, "resource_missing",
                 "webhook_endpoint")
    assert await api.db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE account_id = $1",
                                 api.account_id) == 0


# ---- stripe-python --------------------------------------------------------------------------

def official_library(base: str, key: str) -> None:
    client = stripe.StripeClient(key, base_addresses={"api": base}, max_network_retries=2).v1
    made = client.webhook_endpoints.create(params={
        "url": URL, "enabled_events": ["payment_intent.succeeded", "charge.failed"],
        "description": "shop", "metadata": {"a": "1", "b": "2"}})
    assert isinstance(made, stripe.WebhookEndpoint)
    assert made.secret.startswith("whsec_") and made.status == "enabled"
    changed = client.webhook_endpoints.update(made.id, params={
        "disabled": True, "metadata": {"a": ""}, "enabled_events": ["*"]})
    assert (changed.status, changed.enabled_events, changed.metadata.to_dict()) == \
        ("disabled", ["*"], {"b": "2"})
    assert "secret" not in changed.to_dict()
    others = [client.webhook_endpoints.create(params={"url": URL, "enabled_events": ["*"]}).id
              for _ in range(3)]
    listed = client.webhook_endpoints.list(params={"limit": 2}).auto_paging_iter()
    assert [e.id for e in listed] == [*reversed(others), made.id]
    assert client.webhook_endpoints.retrieve(made.id).description == "shop"
    gone = client.webhook_endpoints.delete(made.id)
    assert gone.deleted is True and gone.id == made.id
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.webhook_endpoints.retrieve(made.id)
    assert missing.value.http_status == 404
    with pytest.raises(stripe.InvalidRequestError) as invalid:
        client.webhook_endpoints.create(params={"url": "ftp://x", "enabled_events": ["*"]})
    assert (invalid.value.http_status, invalid.value.code, invalid.value.param) == \
        (400, "url_invalid", "url")


async def test_official_library_manages_endpoints(api: Client, shared: Stack) -> None:
    await asyncio.to_thread(official_library, shared.base_url.rstrip("/"), api.secret_key)
