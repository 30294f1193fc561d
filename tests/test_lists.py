"""The PaymentIntents and Charges lists and charges by id: keyset pages over 250 settled
payments walked both ways, every filter, accounts kept apart, every bad parameter a clear 400,
and stripe-python's auto-paging and retrieves against them."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
import stripe

from edge import lists, reads
from edge.params import validate
from tests.conftest import Client, Stack
from tests.support import DECLINED, VISA
from tests.test_events_api import assert_error

T = TypeVar("T")

PAYMENTS = 250
# Concurrent creates; each waits for its payment to settle.
CONCURRENCY = 20
CUSTOMERS = ("cus_alice", "cus_bob", None)

INTENTS_ORDER = """
SELECT id FROM payment_intents WHERE account_id = $1 ORDER BY created DESC, id DESC
"""
CHARGES_ORDER = "SELECT id FROM charges WHERE account_id = $1 ORDER BY created DESC, id DESC"


async def bounded(calls: Iterable[Callable[[], Awaitable[T]]]) -> list[T]:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with limit:
            return await call()

    return list(await asyncio.gather(*(one(call) for call in calls)))


async def pay(api: Client, customer: str | None, payment_method: str = VISA,
              status: str = "succeeded") -> dict[str, Any]:
    """A payment confirmed on create; the intent once it settled."""
    created = await api.create(amount=1500, currency="usd", payment_method=payment_method,
                               confirm=True, customer=customer)
    assert created.status == 202, created.body
    return await api.wait_for(created.body["id"], [status], within_s=120)


@dataclass
class Paid:
    """An account with PAYMENTS settled payments, each with one charge; customers in turn."""

    api: Client
    intents: dict[str, dict[str, Any]]  # id -> the intent as GET /v1/payment_intents/{id}
    intent_order: list[str]  # newest first
    charge_order: list[str]  # newest first

    def of(self, customer: str) -> list[str]:
        return [i for i in self.intent_order if self.intents[i]["customer"] == customer]

    def charges_of(self, customer: str) -> list[str]:
        wanted = {self.intents[i]["latest_charge"] for i in self.of(customer)}
        return [c for c in self.charge_order if c in wanted]


@pytest.fixture(scope="module")
async def paid(shared: Stack) -> Paid:
    api = await shared.client()
    settled = await bounded(
        (lambda n=n: pay(api, CUSTOMERS[n % len(CUSTOMERS)])) for n in range(PAYMENTS))
    intents = {i["id"]: i for i in settled}
    intent_order = [r["id"] for r in await api.db.fetch(INTENTS_ORDER, api.account_id)]
    charge_order = [r["id"] for r in await api.db.fetch(CHARGES_ORDER, api.account_id)]
    assert set(intent_order) == set(intents)
    assert set(charge_order) == {i["latest_charge"] for i in settled}
    return Paid(api, intents, intent_order, charge_order)


async def listed(api: Client, path: str, query: str = "") -> dict[str, Any]:
    reply = await api.get(f"{path}?{query}")
    assert reply.status == 200, reply.body
    body: dict[str, Any] = reply.body
    assert set(body) == {"object", "url", "has_more", "data"}
    assert (body["object"], body["url"]) == ("list", path)
    return body


async def ids(api: Client, path: str, query: str = "") -> list[str]:
    return [o["id"] for o in (await listed(api, path, query))["data"]]


async def walk(api: Client, path: str, query: str, cursor: str, start: str | None = None
               ) -> tuple[list[dict[str, Any]], list[int]]:
    """Every object met walking pages with `cursor` (starting_after: newest first; or
    ending_before: oldest first) from `start`, and each page's size. `has_more` must be true on
    every page but the last."""
    seen: list[dict[str, Any]] = []
    sizes: list[int] = []
    position = start
    while True:
        suffix = f"&{cursor}={position}" if position else ""
        body = await listed(api, path, f"{query}{suffix}")
        page = body["data"]
        sizes.append(len(page))
        seen.extend(page if cursor == "starting_after" else reversed(page))
        if not body["has_more"]:
            return seen, sizes
        assert page, body
        position = page[-1]["id"] if cursor == "starting_after" else page[0]["id"]


def newest_first(objects: list[dict[str, Any]]) -> None:
    created = [o["created"] for o in objects]
    assert created == sorted(created, reverse=True)


# ---- pages ----------------------------------------------------------------------------------

async def test_payment_intents_pages_both_ways(paid: Paid) -> None:
    api, order = paid.api, paid.intent_order
    first = await listed(api, "/v1/payment_intents")
    assert [i["id"] for i in first["data"]] == order[:10]
    assert first["has_more"] is True

    forward, sizes = await walk(api, "/v1/payment_intents", "limit=100", "starting_after")
    assert [i["id"] for i in forward] == order
    assert sizes == [100, 100, 50]
    newest_first(forward)
    # Rendered as the retrieve renders them.
    assert forward == [paid.intents[i] for i in order]

    backward, sizes = await walk(api, "/v1/payment_intents", "limit=100", "ending_before",
                                 start=order[-1])
    assert [i["id"] for i in backward] == list(reversed(order[:-1]))
    assert sizes == [100, 100, 49]

    page = await listed(api, "/v1/payment_intents", f"limit=3&ending_before={order[10]}")
    assert [i["id"] for i in page["data"]] == order[7:10]
    assert page["has_more"] is True
    assert await listed(api, "/v1/payment_intents", f"ending_before={order[0]}") == {
        "object": "list", "url": "/v1/payment_intents", "has_more": False, "data": []}
    assert await listed(api, "/v1/payment_intents", f"starting_after={order[-1]}") == {
        "object": "list", "url": "/v1/payment_intents", "has_more": False, "data": []}
    last = await listed(api, "/v1/payment_intents", f"limit=5&starting_after={order[-6]}")
    assert ([i["id"] for i in last["data"]], last["has_more"]) == (order[-5:], False)
    for limit in (1, 100):
        assert len(await ids(api, "/v1/payment_intents", f"limit={limit}")) == limit


async def test_charges_pages_both_ways(paid: Paid) -> None:
    api, order = paid.api, paid.charge_order
    first = await listed(api, "/v1/charges")
    assert [c["id"] for c in first["data"]] == order[:10]
    assert first["has_more"] is True

    forward, sizes = await walk(api, "/v1/charges", "limit=100", "starting_after")
    assert [c["id"] for c in forward] == order
    assert sizes == [100, 100, 50]
    newest_first(forward)
    by_intent = {i["latest_charge"]: i for i in paid.intents.values()}
    for charge in forward:
        intent = by_intent[charge["id"]]
        assert (charge["payment_intent"], charge["status"], charge["amount"]) == \
            (intent["id"], "succeeded", intent["amount"])

    backward, sizes = await walk(api, "/v1/charges", "limit=100", "ending_before",
                                 start=order[-1])
    assert [c["id"] for c in backward] == list(reversed(order[:-1]))
    assert sizes == [100, 100, 49]
    assert (await listed(api, "/v1/charges", f"ending_before={order[0]}"))["data"] == []
    assert (await listed(api, "/v1/charges", f"starting_after={order[-1]}"))["data"] == []

    # Each listed charge is what both retrieves answer.
    async def retrieved(charge: dict[str, Any]) -> None:
        one = await api.get(f"/v1/charges/{charge['id']}")
        assert (one.status, one.body) == (200, charge)
        latest = await api.get(f"/v1/payment_intents/{charge['payment_intent']}/charge")
        assert (latest.status, latest.body) == (200, charge)

    await bounded((lambda c=c: retrieved(c)) for c in forward)


async def test_a_cursor_keeps_its_place_while_payments_arrive(api: Client) -> None:
    older = await bounded((lambda: pay(api, None)) for _ in range(12))
    # An hour back, so that every payment made below is newer: `created` counts seconds, and
    # within one second the order is the ids'.
    for table in ("payment_intents", "charges"):
        await api.db.execute(f"UPDATE {table} SET created = created - interval '1 hour' "
                             "WHERE account_id = $1", api.account_id)
    older_ids = [r["id"] for r in await api.db.fetch(INTENTS_ORDER, api.account_id)]
    assert set(older_ids) == {i["id"] for i in older}
    page = await ids(api, "/v1/payment_intents", "limit=5")
    charges = await ids(api, "/v1/charges", "limit=5")
    newer = await bounded((lambda: pay(api, None)) for _ in range(3))
    rest = await ids(api, "/v1/payment_intents", f"limit=100&starting_after={page[-1]}")
    assert page + rest == older_ids
    assert set(await ids(api, "/v1/payment_intents", f"ending_before={page[0]}")) == \
        {i["id"] for i in newer}
    assert set(await ids(api, "/v1/charges", f"ending_before={charges[0]}")) == \
        {i["latest_charge"] for i in newer}


# ---- filters --------------------------------------------------------------------------------

async def test_customer_filters(paid: Paid) -> None:
    api = paid.api
    for customer in ("cus_alice", "cus_bob"):
        intents, sizes = await walk(api, "/v1/payment_intents", f"customer={customer}&limit=30",
                                    "starting_after")
        assert [i["id"] for i in intents] == paid.of(customer)
        assert len(sizes) == 3 and {i["customer"] for i in intents} == {customer}
        back, _ = await walk(api, "/v1/payment_intents", f"customer={customer}&limit=30",
                             "ending_before", start=paid.of(customer)[-1])
        assert [i["id"] for i in back] == list(reversed(paid.of(customer)[:-1]))

        charges, sizes = await walk(api, "/v1/charges", f"customer={customer}&limit=30",
                                    "starting_after")
        assert [c["id"] for c in charges] == paid.charges_of(customer)
        assert len(sizes) == 3
        back, _ = await walk(api, "/v1/charges", f"customer={customer}&limit=30",
                             "ending_before", start=paid.charges_of(customer)[-1])
        assert [c["id"] for c in back] == list(reversed(paid.charges_of(customer)[:-1]))
    # A cursor from outside the filtered list still marks a place in it.
    without = [i for i in paid.intent_order if paid.intents[i]["customer"] is None]
    after = await ids(api, "/v1/payment_intents", f"customer=cus_bob&limit=100&starting_after="
                      f"{without[0]}")
    position = paid.intent_order.index(without[0])
    assert after == [i for i in paid.of("cus_bob") if paid.intent_order.index(i) > position]
    for path in ("/v1/payment_intents", "/v1/charges"):
        assert await ids(api, path, "customer=cus_nobody") == []
        # Customers are matched exactly.
        assert await ids(api, path, "customer=CUS_ALICE") == []
        assert await ids(api, path, "customer=cus_") == []
    # An empty value is no filter, as for every optional parameter.
    assert await ids(api, "/v1/payment_intents", "customer=") == paid.intent_order[:10]


async def test_charges_of_one_payment_intent(api: Client) -> None:
    declined = await pay(api, "cus_carol", DECLINED, "requires_payment_method")
    failed_charge = declined["latest_charge"]
    retried = await api.post(f"/v1/payment_intents/{declined['id']}/confirm",
                             {"payment_method": VISA})
    assert retried.status == 202, retried.body
    succeeded = await api.wait_for(declined["id"], ["succeeded"])
    other = await pay(api, "cus_carol")
    assert succeeded["latest_charge"] != failed_charge

    both = (await listed(api, "/v1/charges", f"payment_intent={declined['id']}"))["data"]
    assert [(c["id"], c["status"]) for c in both] == [
        (succeeded["latest_charge"], "succeeded"), (failed_charge, "failed")]
    assert both[1]["failure_code"] == "card_declined"
    assert await ids(api, "/v1/charges", f"payment_intent={other['id']}") == \
        [other["latest_charge"]]
    page = await listed(api, "/v1/charges", f"payment_intent={declined['id']}&limit=1")
    assert ([c["id"] for c in page["data"]], page["has_more"]) == \
        ([succeeded["latest_charge"]], True)
    rest = await listed(api, "/v1/charges", f"payment_intent={declined['id']}&limit=1"
                        f"&starting_after={succeeded['latest_charge']}")
    assert ([c["id"] for c in rest["data"]], rest["has_more"]) == ([failed_charge], False)
    # Filters together.
    assert await ids(api, "/v1/charges", f"payment_intent={other['id']}&customer=cus_carol") \
        == [other["latest_charge"]]
    assert await ids(api, "/v1/charges", f"payment_intent={other['id']}&customer=cus_dan") == []
    # An intent with no charge, or none of this account's, has none to list.
    waiting = await api.create(amount=500, currency="usd")
    await api.wait_for(waiting.body["id"], ["requires_payment_method"])
    for intent_id in (waiting.body["id"], "pi_" + "a" * 24, "pi_123", "nothing"):
        assert await ids(api, "/v1/charges", f"payment_intent={intent_id}") == []


async def test_created_filters(api: Client) -> None:
    """Intents and charges moved to known seconds (each account's rows are its own test's)."""
    settled = await bounded((lambda: pay(api, "cus_eve")) for _ in range(5))
    base = 1_700_000_000
    seconds = [base, base + 0.4, base + 1, base + 2.9, base + 3]
    intent_ids = [i["id"] for i in settled]
    charge_ids = [i["latest_charge"] for i in settled]
    when = [datetime.fromtimestamp(s, UTC) for s in seconds]
    await api.db.execute(
        "UPDATE payment_intents p SET created = t.created FROM unnest($1::text[], "
        "$2::timestamptz[]) AS t(id, created) WHERE p.id = t.id", intent_ids, when)
    await api.db.execute(
        "UPDATE charges c SET created = t.created FROM unnest($1::text[], "
        "$2::timestamptz[]) AS t(id, created) WHERE c.id = t.id", charge_ids, when)

    for path, made in (("/v1/payment_intents", intent_ids), ("/v1/charges", charge_ids)):
        async def at(query: str, path: str = path, made: list[str] = made) -> list[int]:
            found = await ids(api, path, query)
            return sorted(made.index(i) for i in found)

        assert await at(f"created={base}") == [0, 1]
        assert await at(f"created[gt]={base}") == [2, 3, 4]
        assert await at(f"created[gte]={base + 1}") == [2, 3, 4]
        assert await at(f"created[lt]={base + 2}") == [0, 1, 2]
        assert await at(f"created[lte]={base + 2}") == [0, 1, 2, 3]
        assert await at(f"created[gt]={base}&created[lt]={base + 3}") == [2, 3]
        assert await at(f"created[gte]={base + 3}&created[lte]={base + 3}") == [4]
        assert await at(f"created[gte]={base + 4}") == []
        assert await at("created[gt]=" + "9" * 40) == []
        assert await at("created[gt]=-" + "9" * 40) == [0, 1, 2, 3, 4]
        # With the other filters and a cursor.
        assert await at(f"created[lte]={base + 2}&customer=cus_eve&limit=2") == [2, 3]
        assert await at(f"created[lte]={base + 2}&starting_after={made[2]}") == [0, 1]
        assert await at(f"created[lte]={base + 2}&customer=cus_zed") == []
        assert (await listed(api, path, f"created={base + 3}"))["data"][0]["created"] == base + 3


# ---- plans ----------------------------------------------------------------------------------

class Explained:
    """A connection for lists.page that records the plan of each page it reads."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.plans: list[dict[str, Any]] = []

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetchrow(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> Any:
        plan = await self.conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
        self.plans.append(json.loads(plan)[0]["Plan"])
        return await self.conn.fetch(sql, *args)


def nodes(plan: dict[str, Any]) -> Iterable[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


async def test_each_list_and_filter_reads_an_index_in_the_list_order(paid: Paid) -> None:
    """With sequential and bitmap scans ruled out, every page is an index scan that yields
    rows in the page's order (no sort), on the index made for it
    (ops/migrations/0007_lists.sql)."""
    api = paid.api
    middle, charge = paid.intent_order[50], paid.charge_order[50]
    cases: list[tuple[lists.Listing, dict[str, Any], str | set[str] | None, int]] = [
        (reads.INTENTS, {}, "payment_intents_account", 10),
        (reads.INTENTS, {"starting_after": middle}, "payment_intents_account", 10),
        (reads.INTENTS, {"ending_before": middle}, "payment_intents_account", 10),
        (reads.INTENTS, {"created": {"lte": str(paid.intents[middle]["created"])}},
         "payment_intents_account", 10),
        # The customer's index, or the account's read in the same order with the customer
        # filtered: which, the planner picks by how common the customer is in the table's
        # statistics (cus_alice is the most common customer of the tests' intents).
        (reads.INTENTS, {"customer": "cus_alice", "starting_after": middle},
         {"payment_intents_customer", "payment_intents_account"}, 10),
        (reads.CHARGES, {}, "charges_account", 10),
        (reads.CHARGES, {"starting_after": charge}, "charges_account", 10),
        (reads.CHARGES, {"ending_before": charge, "limit": "100"}, "charges_account", 50),
        (reads.CHARGES, {"payment_intent": middle}, "charges_intent_page", 1),
        # Charges have no customer of their own: the planner picks the way in (no sort
        # asserted), never a scan of a whole table.
        (reads.CHARGES, {"customer": "cus_bob", "starting_after": charge}, None, 10),
    ]
    async with api.db.acquire() as conn, conn.transaction():
        # Small tables make other plans cheap for the planner; ruled out, what is left shows
        # whether an index serves the page in its order.
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute("SET LOCAL enable_bitmapscan = off")
        for listing, query, index, count in cases:
            spec = reads.LIST_INTENTS if listing is reads.INTENTS else reads.LIST_CHARGES
            values = validate(query, spec)
            where = (reads.intents_where if listing is reads.INTENTS else reads.charges_where)(
                api.account_id, values)
            db = Explained(conn)
            rows, _ = await lists.page(db, listing, where, values)
            assert len(rows) == count, (query, len(rows))
            (plan,) = db.plans
            types = [n["Node Type"] for n in nodes(plan)]
            assert "Seq Scan" not in types, (query, types)
            if index is not None:
                assert "Sort" not in types and "Incremental Sort" not in types, (query, types)
                used = {n.get("Index Name") for n in nodes(plan)}
                assert used & ({index} if isinstance(index, str) else index), (query, plan)


# ---- accounts -------------------------------------------------------------------------------

async def test_accounts_see_only_their_own(paid: Paid, shared: Stack) -> None:
    other = await shared.client()
    theirs = await bounded((lambda c=c: pay(other, c)) for c in ("cus_alice", "cus_alice",
                                                                  None))
    their_intents = [i["id"] for i in theirs]
    their_charges = [i["latest_charge"] for i in theirs]
    api = paid.api

    assert sorted(await ids(other, "/v1/payment_intents", "limit=100")) == sorted(their_intents)
    assert sorted(await ids(other, "/v1/charges", "limit=100")) == sorted(their_charges)
    assert sorted(await ids(other, "/v1/charges", "customer=cus_alice")) == \
        sorted(their_charges[:2])
    mine, _ = await walk(api, "/v1/payment_intents", "limit=100&customer=cus_alice",
                         "starting_after")
    assert [i["id"] for i in mine] == paid.of("cus_alice")
    mine, _ = await walk(api, "/v1/charges", "limit=100&customer=cus_alice", "starting_after")
    assert [c["id"] for c in mine] == paid.charges_of("cus_alice")

    for path, objects in (("/v1/payment_intents", their_intents),
                          ("/v1/charges", their_charges)):
        for cursor in ("starting_after", "ending_before"):
            reply = await api.get(f"{path}?{cursor}={objects[0]}")
            assert_error(reply, 400, "resource_missing", cursor)
            assert objects[0] in reply.error["message"]
    for charge_id in their_charges:
        assert_error(await api.get(f"/v1/charges/{charge_id}"), 404, "resource_missing", "id")
    assert await ids(api, "/v1/charges", f"payment_intent={their_intents[0]}") == []
    # Mine, theirs: each sees its own, through the same filters.
    mine_one = await api.get(f"/v1/charges/{paid.charge_order[0]}")
    assert mine_one.status == 200
    assert_error(await other.get(f"/v1/charges/{paid.charge_order[0]}"), 404,
                 "resource_missing", "id")
    for path in ("/v1/payment_intents", "/v1/charges", f"/v1/charges/{their_charges[0]}"):
        assert_error(await api.get(path, auth=None), 401, "api_key_missing", None)


# ---- bad input ------------------------------------------------------------------------------

COMMON_BAD = [
    ("limit=0", "parameter_invalid_integer", "limit"),
    ("limit=101", "parameter_invalid_integer", "limit"),
    ("limit=-1", "parameter_invalid_integer", "limit"),
    ("limit=ten", "parameter_invalid_integer", "limit"),
    ("limit=" + "9" * 5000, "parameter_invalid_integer", "limit"),
    ("limit[0]=1", "parameter_invalid_integer", "limit"),
    ("limit=1&limit=2", "invalid_request", "limit"),
    ("starting_after=pi_" + "a" * 24, "resource_missing", "starting_after"),
    ("ending_before=pi_" + "a" * 24, "resource_missing", "ending_before"),
    ("starting_after=ch_" + "a" * 24, "resource_missing", "starting_after"),
    ("ending_before=ch_" + "a" * 24, "resource_missing", "ending_before"),
    ("starting_after=evt_" + "a" * 24, "resource_missing", "starting_after"),
    ("starting_after=pi_123", "resource_missing", "starting_after"),
    ("starting_after=" + "x" * 5001, "parameter_invalid", "starting_after"),
    ("starting_after=%00", "parameter_invalid", "starting_after"),
    ("starting_after[x]=1", "parameter_invalid", "starting_after"),
    ("created=soon", "parameter_invalid_integer", "created"),
    ("created[gt]=1.5", "parameter_invalid_integer", "created[gt]"),
    ("created[after]=1", "parameter_unknown", "created[after]"),
    ("customer=" + "c" * 256, "parameter_invalid", "customer"),
    ("customer=%00", "parameter_invalid", "customer"),
    ("customer[id]=cus_alice", "parameter_invalid", "customer"),
    ("expand[0]=data", "parameter_unknown", "expand"),
    ("status=succeeded", "parameter_unknown", "status"),
    ("%ff=1", "invalid_request", None),
    ("limit", "invalid_request", None),
]
CHARGES_BAD = [
    ("payment_intent=" + "p" * 256, "parameter_invalid", "payment_intent"),
    ("payment_intent=%00", "parameter_invalid", "payment_intent"),
    ("payment_intent[0]=pi_x", "parameter_invalid", "payment_intent"),
]


def _id(value: Any) -> str:
    return str(value)[:40]


@pytest.mark.parametrize(("path", "query", "code", "param"), [
    *(("/v1/payment_intents", *case) for case in COMMON_BAD),
    ("/v1/payment_intents", "payment_intent=pi_" + "a" * 24, "parameter_unknown",
     "payment_intent"),
    *(("/v1/charges", *case) for case in COMMON_BAD + CHARGES_BAD),
], ids=_id)
async def test_bad_list_parameters_are_a_clear_400(api: Client, path: str, query: str, code: str,
                                                   param: str | None) -> None:
    assert_error(await api.get(f"{path}?{query}"), 400, code, param)


async def test_both_cursors_at_once_is_a_400(api: Client) -> None:
    first, second = await bounded((lambda: pay(api, None)) for _ in range(2))
    for path, key in (("/v1/payment_intents", "id"), ("/v1/charges", "latest_charge")):
        reply = await api.get(f"{path}?starting_after={first[key]}&ending_before={second[key]}")
        assert_error(reply, 400, "invalid_request", "ending_before")
        assert reply.error["message"] == \
            "You may pass either starting_after or ending_before, not both."
    # A cursor of the other list names nothing in this one.
    assert_error(await api.get(f"/v1/charges?starting_after={first['id']}"), 400,
                 "resource_missing", "starting_after")
    assert_error(await api.get(f"/v1/payment_intents?ending_before={first['latest_charge']}"),
                 400, "resource_missing", "ending_before")


@pytest.mark.parametrize("charge_id", [
    "ch_" + "a" * 24, "ch_short", "pi_" + "a" * 24, "%00", "ch_" + "a" * 5000, "x"], ids=_id)
async def test_unknown_charges_are_a_404(api: Client, charge_id: str) -> None:
    reply = await api.get(f"/v1/charges/{charge_id}")
    assert_error(reply, 404, "resource_missing", "id")
    assert reply.error["message"].startswith("No such charge: ")


async def test_retrieve_takes_no_parameters(api: Client) -> None:
    intent = await pay(api, None)
    charge = intent["latest_charge"]
    assert_error(await api.get(f"/v1/charges/{charge}?limit=1"), 400, "parameter_unknown",
                 "limit")
    assert_error(await api.get(f"/v1/charges/{charge}?%ff=1"), 400, "invalid_request", None)
    assert (await api.get(f"/v1/charges/{charge}")).status == 200


# ---- stripe-python --------------------------------------------------------------------------

def sdk(base: str, key: str) -> Any:
    return stripe.StripeClient(key, base_addresses={"api": base}, max_network_retries=2).v1


def official_library(base: str, paid: Paid) -> None:
    client = sdk(base, paid.api.secret_key)
    intents = client.payment_intents.list(params={"limit": 40})
    listed_intents = list(intents.auto_paging_iter())
    assert [i.id for i in listed_intents] == paid.intent_order
    assert all(isinstance(i, stripe.PaymentIntent) for i in listed_intents)
    newest = paid.intents[paid.intent_order[0]]
    assert (listed_intents[0].status, listed_intents[0].customer,
            listed_intents[0].latest_charge) == \
        ("succeeded", newest["customer"], newest["latest_charge"])
    # Back from the oldest: the library walks with ending_before and yields oldest first.
    back = client.payment_intents.list(params={"limit": 60,
                                               "ending_before": paid.intent_order[-1]})
    assert [i.id for i in back.auto_paging_iter()] == list(reversed(paid.intent_order[:-1]))
    alice = client.payment_intents.list(params={"customer": "cus_alice", "limit": 25})
    assert [i.id for i in alice.auto_paging_iter()] == paid.of("cus_alice")

    charges = client.charges.list(params={"limit": 35})
    listed_charges = list(charges.auto_paging_iter())
    assert [c.id for c in listed_charges] == paid.charge_order
    assert all(isinstance(c, stripe.Charge) for c in listed_charges)
    bob = client.charges.list(params={"customer": "cus_bob", "limit": 50})
    assert [c.id for c in bob.auto_paging_iter()] == paid.charges_of("cus_bob")
    some = paid.intents[paid.intent_order[7]]
    of_intent = client.charges.list(params={"payment_intent": some["id"]})
    assert [c.id for c in of_intent.auto_paging_iter()] == [some["latest_charge"]]
    created = some["created"]
    window = client.charges.list(params={"created": {"gte": created - 3600}, "limit": 100})
    assert len(list(window.auto_paging_iter())) == PAYMENTS

    charge = client.charges.retrieve(some["latest_charge"])
    assert isinstance(charge, stripe.Charge)
    assert (charge.id, charge.payment_intent, charge.status, charge.paid, charge.amount) == \
        (some["latest_charge"], some["id"], "succeeded", True, some["amount"])
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.charges.retrieve("ch_" + "b" * 24)
    assert missing.value.http_status == 404 and missing.value.code == "resource_missing"
    assert missing.value.param == "id"
    with pytest.raises(stripe.InvalidRequestError) as bad_cursor:
        client.charges.list(params={"starting_after": "ch_" + "b" * 24})
    assert bad_cursor.value.http_status == 400 and bad_cursor.value.param == "starting_after"
    with pytest.raises(stripe.InvalidRequestError) as bad_limit:
        client.payment_intents.list(params={"limit": 101})
    assert bad_limit.value.param == "limit"


def global_api(paid: Paid) -> None:
    """The library's module-level API (`stripe.api_base`, `stripe.Charge.retrieve`)."""
    key = paid.api.secret_key
    some = paid.intents[paid.intent_order[3]]
    charge = stripe.Charge.retrieve(some["latest_charge"], api_key=key)
    assert isinstance(charge, stripe.Charge)
    assert (charge.id, charge.payment_intent) == (some["latest_charge"], some["id"])
    listed_intents = stripe.PaymentIntent.list(api_key=key, limit=100)
    assert [i.id for i in listed_intents.auto_paging_iter()] == paid.intent_order
    listed_charges = stripe.Charge.list(api_key=key, limit=100, customer="cus_alice")
    assert [c.id for c in listed_charges.auto_paging_iter()] == paid.charges_of("cus_alice")


async def test_official_library_lists_and_retrieves(paid: Paid, shared: Stack,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    base = shared.base_url.rstrip("/")
    await asyncio.to_thread(official_library, base, paid)
    monkeypatch.setattr(stripe, "api_base", base)
    await asyncio.to_thread(global_api, paid)


async def test_a_list_shows_what_is_applied(api: Client) -> None:
    """An intent is listed once applied, as it then reads; a key's retry lists it once."""
    key = str(uuid.uuid4())
    first = await api.post("/v1/payment_intents", {"amount": "700", "currency": "eur"}, key=key)
    again = await api.post("/v1/payment_intents", {"amount": "700", "currency": "eur"}, key=key)
    assert (first.status, again.status) == (202, 202)
    intent = await api.wait_for(first.body["id"], ["requires_payment_method"])
    assert (await listed(api, "/v1/payment_intents"))["data"] == [intent]
    assert await ids(api, "/v1/charges") == []
