"""Bad input: every one gets a Stripe-shaped error (never a 5xx), and changes nothing.

"Changes nothing" is shown the same way for each case: no idempotency record and no pending
command in Redis, no intent or inbox row in Postgres, and the same Idempotency-Key then works
with a valid body (202, not a replay). Its intent has the same id as the bad request would
have had, so a bad command that slipped through would be applied before it (same partition,
same order) and show up in the counts.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

import asyncpg
import pytest

from contracts import ids
from contracts.commands import ClientCommand
from contracts.pending import redis_key as pending_key
from tests.conftest import Client, Reply, Stack

VALID = {"amount": "1000", "currency": "usd"}
FORM = "application/x-www-form-urlencoded"
ERROR_KEYS = {"type", "code", "decline_code", "message", "param"}


def assert_error(reply: Reply, status: int, code: str | None, param: str | None,
                 type_: str = "invalid_request_error") -> None:
    """The error as Stripe's libraries read it: a key left out is None. A key present is never
    null, as Stripe's schema has it."""
    assert reply.status == status, reply.body
    error = reply.error
    assert set(error) <= ERROR_KEYS and None not in error.values(), error
    assert (error["type"], error.get("code"), error.get("param")) == (type_, code, param), error
    assert isinstance(error["message"], str) and error["message"]
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers["Request-Id"]


async def count(api: Client, table: str) -> int:
    return int(await api.db.fetchval(
        f"SELECT count(*) FROM {table} WHERE account_id = $1", api.account_id))


async def assert_nothing_stored(api: Client, shared: Stack, key: str) -> None:
    intent_id = ids.intent_id(shared.settings.secret_bytes, api.account_id, key)
    assert await shared.redis.exists(f"idem:{api.account_id}:{key}") == 0
    assert await shared.redis.exists(pending_key(api.account_id, intent_id)) == 0
    assert await count(api, "payment_intents") == 0
    assert await count(api, "inbox") == 0


async def assert_key_still_works(api: Client, shared: Stack, key: str) -> None:
    """Nothing was stored for `key`, and a valid create with it is the account's only intent."""
    await assert_nothing_stored(api, shared, key)
    ok = await api.post("/v1/payment_intents", VALID, key=key)
    assert ok.status == 202, ok.body
    assert "Idempotent-Replayed" not in ok.headers and ok.headers["Request-Id"]
    applied = await api.wait_for(ok.body["id"], ["requires_payment_method"])
    assert (applied["amount"], applied["currency"]) == (1000, "usd")
    assert await count(api, "payment_intents") == 1
    assert await count(api, "inbox") == 1


async def raw_request(base_url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """(status, raw response) for bytes the aiohttp client will not send (bad header bytes)."""
    url = urlsplit(base_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(head + b"Host: test\r\nConnection: close\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(10):
            response = await reader.read()
    finally:
        writer.close()
    return int(response.split(b" ", 2)[1]), response


# ---- create: the body --------------------------------------------------------------------

def form(body: str) -> dict[str, Any]:
    return {"body": body.encode(), "content_type": FORM}


def raw_json(body: str) -> dict[str, Any]:
    return {"body": body.encode(), "content_type": "application/json"}


BAD_BODIES: list[tuple[str, dict[str, Any], str, str | None]] = [
    # (case, how it is sent, code, param)
    ("amount missing", {"data": {"currency": "usd"}}, "parameter_missing", "amount"),
    ("amount empty", {"data": {"amount": "", "currency": "usd"}}, "parameter_missing", "amount"),
    ("currency missing", {"data": {"amount": "100"}}, "parameter_missing", "currency"),
    ("nothing at all", {"data": {}}, "parameter_missing", "amount"),
    ("amount abc", {"data": {"amount": "abc", "currency": "usd"}},
     "parameter_invalid_integer", "amount"),
    ("amount 1.5", {"data": {"amount": "1.5", "currency": "usd"}},
     "parameter_invalid_integer", "amount"),
    ("amount -5", {"data": {"amount": "-5", "currency": "usd"}}, "amount_too_small", "amount"),
    ("amount 0", {"data": {"amount": "0", "currency": "usd"}}, "amount_too_small", "amount"),
    ("amount 100000000", {"data": {"amount": "100000000", "currency": "usd"}},
     "amount_too_large", "amount"),
    # Past Python's 4300-digit limit on int(str): once a 500.
    ("amount 5000 digits", {"data": {"amount": "9" * 5000, "currency": "usd"}},
     "parameter_invalid_integer", "amount"),
    ("amount as a hash", form("amount[x]=5&currency=usd"), "parameter_invalid_integer", "amount"),
    ("json amount 1.5", {"json": {"amount": 1.5, "currency": "usd"}},
     "parameter_invalid_integer", "amount"),
    ("json amount true", {"json": {"amount": True, "currency": "usd"}},
     "parameter_invalid_integer", "amount"),
    ("json amount list", {"json": {"amount": [100], "currency": "usd"}},
     "parameter_invalid_integer", "amount"),
    ("json amount string 12.0", {"json": {"amount": "12.0", "currency": "usd"}},
     "parameter_invalid_integer", "amount"),
    ("json amount null", {"json": {"amount": None, "currency": "usd"}},
     "parameter_missing", "amount"),
    ("json amount 2**63", {"json": {"amount": 2**63, "currency": "usd"}},
     "amount_too_large", "amount"),
    ("currency xyz", {"data": {"amount": "100", "currency": "xyz"}}, "parameter_invalid",
     "currency"),
    ("json currency number", {"json": {"amount": 100, "currency": 840}}, "parameter_invalid",
     "currency"),
    ("unknown foo", {"data": {**VALID, "foo": "bar"}}, "parameter_unknown", "foo"),
    ("unknown nested", form("amount=100&currency=usd&foo[bar]=1"), "parameter_unknown", "foo"),
    ("json unknown nested", {"json": {"amount": 100, "currency": "usd",
                                      "payment_method_options": {"card": {"x": 1}}}},
     "parameter_unknown", "payment_method_options"),
    ("metadata 51 keys", {"data": {**VALID, **{f"metadata[k{i}]": "v" for i in range(51)}}},
     "parameter_invalid", "metadata"),
    ("metadata 41-char key", {"data": {**VALID, f"metadata[{'k' * 41}]": "v"}},
     "parameter_invalid", f"metadata[{'k' * 41}]"),
    ("metadata 501-char value", {"data": {**VALID, "metadata[note]": "v" * 501}},
     "parameter_invalid", "metadata[note]"),
    ("metadata nested too deep", form("amount=100&currency=usd&metadata[a][b]=1"),
     "parameter_invalid", "metadata[a]"),
    ("metadata not a hash", {"data": {**VALID, "metadata": "abc"}}, "parameter_invalid",
     "metadata"),
    ("json metadata as a list", {"json": {"amount": 100, "currency": "usd", "metadata": ["a"]}},
     "parameter_invalid", "metadata"),
    ("json metadata value null", {"json": {"amount": 100, "currency": "usd",
                                           "metadata": {"a": None}}},
     "parameter_invalid", "metadata[a]"),
    # Postgres cannot store U+0000: these were once accepted and then failed in the processor.
    ("json metadata empty key", {"json": {"amount": 100, "currency": "usd",
                                          "metadata": {"": "x"}}},
     "parameter_invalid", "metadata[]"),
    ("metadata NUL value", {"json": {"amount": 100, "currency": "usd",
                                     "metadata": {"a": "x\u0000"}}},
     "parameter_invalid", "metadata[a]"),
    ("description NUL", {"data": {**VALID, "description": "a\x00b"}}, "parameter_invalid",
     "description"),
    ("description 1001 chars", {"data": {**VALID, "description": "d" * 1001}},
     "parameter_invalid", "description"),
    ("json description number", {"json": {"amount": 100, "currency": "usd", "description": 5}},
     "parameter_invalid", "description"),
    ("customer 256 chars", {"data": {**VALID, "customer": "c" * 256}}, "parameter_invalid",
     "customer"),
    ("payment_method card_123", {"data": {**VALID, "payment_method": "card_123"}},
     "resource_missing", "payment_method"),
    ("confirm maybe", {"data": {**VALID, "payment_method": "pm_card_visa", "confirm": "maybe"}},
     "parameter_invalid_boolean", "confirm"),
    ("confirm without payment_method", {"data": {**VALID, "confirm": "true"}},
     "payment_intent_unexpected_state", "payment_method"),
    ("json confirm without payment_method", {"json": {"amount": 100, "currency": "usd",
                                                      "confirm": True}},
     "payment_intent_unexpected_state", "payment_method"),
    ("malformed json", raw_json('{"amount": 100, "currency": '), "invalid_request", None),
    ("json array", raw_json('[{"amount": 100, "currency": "usd"}]'), "invalid_request", None),
    ("json string", raw_json('"amount=100"'), "invalid_request", None),
    ("json lone surrogate", raw_json('{"amount": 1000, "currency": "usd", "description": '
                                     '"\\ud800"}'), "invalid_request", None),
    ("text/plain", {"body": b"amount=100&currency=usd", "content_type": "text/plain"},
     "invalid_content_type", None),
    ("multipart", {"body": b"--x--", "content_type": "multipart/form-data; boundary=x"},
     "invalid_content_type", None),
    ("duplicated parameter", form("amount=100&amount=100&currency=usd"), "invalid_request",
     "amount"),
    ("hash then scalar", form("amount=100&currency=usd&metadata[a]=1&metadata=x"),
     "invalid_request", "metadata"),
    ("scalar then hash", form("amount=100&currency=usd&metadata=x&metadata[a]=1"),
     "invalid_request", "metadata[a]"),
    ("unclosed bracket", form("amount[=100&currency=usd"), "invalid_request", "amount["),
    ("stray bracket", form("amount]=100&currency=usd"), "invalid_request", "amount]"),
    ("text after bracket", form("amount=100&currency=usd&metadata[a]b=1"), "invalid_request",
     "metadata[a]b"),
    ("bracket first", form("amount=100&currency=usd&[a]=1"), "invalid_request", "[a]"),
    ("empty brackets", form("amount=100&currency=usd&metadata[]=1"), "invalid_request",
     "metadata[]"),
    ("pair without =", form("amount=100&currency"), "invalid_request", None),
    ("invalid utf-8", form("amount=100&currency=usd&description=%ff"), "invalid_request", None),
    ("undeclared charset", {"body": b"amount=100&currency=usd",
                            "content_type": f"{FORM}; charset=no-such-charset"},
     "invalid_request", None),
    # ---- UTF-8 only: text that UTF-8 cannot hold once reached the fingerprint (a 500).
    ("utf-7 lone surrogate", {"body": b"description=+2AA-",
                              "content_type": f"{FORM}; charset=utf-7"}, "invalid_request", None),
    ("utf-7 valid otherwise", {"body": b"amount=1000&currency=usd",
                               "content_type": f"{FORM}; charset=utf-7"}, "invalid_request", None),
    ("latin-1 form", {"body": b"amount=1000&currency=usd&description=caf\xe9",
                      "content_type": f"{FORM}; charset=iso-8859-1"}, "invalid_request", None),
    ("json utf-7", {"body": b'{"amount": 1000, "currency": "usd", "description": "+2AA-"}',
                    "content_type": "application/json; charset=utf-7"}, "invalid_request", None),
    ("json utf-16", {"body": '{"amount": 1000, "currency": "usd"}'.encode("utf-16"),
                     "content_type": "application/json; charset=utf-16"},
     "invalid_request", None),
    ("percent-encoded surrogate", form("amount=1000&currency=usd&description=%ED%A0%80"),
     "invalid_request", None),
    ("percent-encoded overlong NUL", form("amount=1000&currency=usd&description=%C0%80"),
     "invalid_request", None),
    ("percent-encoded bad key", form("amount=1000&currency=usd&metadata[%ff]=x"),
     "invalid_request", None),
    ("raw bytes not utf-8 in a form", {"body": b"amount=1000&currency=usd&description=\xff",
                                       "content_type": FORM}, "invalid_request", None),
    ("raw bytes not utf-8 in json", {"body": b'{"amount": 1000, "currency": "usd", '
                                             b'"description": "\xff"}',
                                     "content_type": "application/json"},
     "invalid_request", None),
    ("surrogate as raw bytes in json", {"body": b'{"amount": 1000, "currency": "usd", '
                                                b'"description": "\xed\xa0\x80"}',
                                        "content_type": "application/json"},
     "invalid_request", None),
    ("json lone low surrogate", raw_json('{"amount": 1000, "currency": "usd", "description": '
                                         '"\\udc00\\ud800"}'), "invalid_request", None),
    ("json surrogate in a key", raw_json('{"amount": 1000, "currency": "usd", "metadata": '
                                         '{"\\ud800": "x"}}'), "invalid_request", None),
    # ---- Stripe's rules per currency.
    ("usd below 0.50", {"data": {"amount": "49", "currency": "usd"}}, "amount_too_small",
     "amount"),
    ("jpy below 50 yen", {"data": {"amount": "49", "currency": "jpy"}}, "amount_too_small",
     "amount"),
    ("gbp below 0.30", {"data": {"amount": "29", "currency": "gbp"}}, "amount_too_small",
     "amount"),
    ("idr below its derived minimum", {"data": {"amount": "1000", "currency": "idr"}},
     "amount_too_small", "amount"),
    ("kwd not ending in 0", {"data": {"amount": "1005", "currency": "kwd"}},
     "invalid_charge_amount", "amount"),
    ("bhd below its minimum", {"data": {"amount": "180", "currency": "bhd"}},
     "amount_too_small", "amount"),
    ("isk with fractions", {"data": {"amount": "10050", "currency": "isk"}},
     "invalid_charge_amount_no_decimal_compatible", "amount"),
    ("ugx with fractions", {"data": {"amount": "200050", "currency": "ugx"}},
     "invalid_charge_amount_no_decimal_compatible", "amount"),
    ("iso currency Stripe does not take", {"data": {"amount": "100000", "currency": "irr"}},
     "parameter_invalid", "currency"),
    ("stn (Stripe says std)", {"data": {"amount": "100000", "currency": "stn"}},
     "parameter_invalid", "currency"),
]


@pytest.mark.parametrize(("how", "code", "param"), [c[1:] for c in BAD_BODIES],
                         ids=[c[0] for c in BAD_BODIES])
async def test_bad_create_body(api: Client, shared: Stack, how: dict[str, Any], code: str,
                               param: str | None) -> None:
    key = f"bad-{uuid.uuid4()}"
    reply = await api.post("/v1/payment_intents", key=key, **how)
    assert_error(reply, 400, code, param)
    await assert_key_still_works(api, shared, key)


async def test_json_string_of_digits_is_an_integer(api: Client) -> None:
    """Form encoding sends every value as a string, so JSON may too: "12" is amount 12; the
    same parameters as a form or as JSON are the same request."""
    key = str(uuid.uuid4())
    created = await api.post("/v1/payment_intents", json={"amount": "1200", "currency": "USD"},
                             key=key)
    assert created.status == 202, created.body
    assert (created.body["amount"], created.body["currency"]) == (1200, "usd")
    again = await api.post("/v1/payment_intents", {"amount": "1200", "currency": "usd"}, key=key)
    assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.body["id"] == created.body["id"]


@pytest.mark.parametrize("content_type", [
    FORM, f"{FORM}; charset=utf-8", f"{FORM}; charset=UTF-8", f"{FORM}; charset=utf8",
    f'{FORM}; charset="utf-8"', "application/json", "application/json; charset=utf-8",
])
async def test_utf8_is_accepted_however_it_is_named(api: Client, content_type: str) -> None:
    """A missing charset means UTF-8; text outside the BMP arrives whole (as a surrogate pair
    escape in JSON, as four percent-escaped bytes in a form)."""
    text = "café ☕ 𝄞"
    if content_type.startswith("application/json"):
        body = b'{"amount": 1000, "currency": "usd", "description": "caf\\u00e9 \xe2\x98\x95 ' \
            b'\\ud834\\udd1e"}'
    else:
        body = b"amount=1000&currency=usd&description=" + quote(text).encode()
    created = await api.post("/v1/payment_intents", body=body, content_type=content_type)
    assert created.status == 202, created.body
    assert created.body["description"] == text
    applied = await api.wait_for(created.body["id"], ["requires_payment_method"])
    assert applied["description"] == text


async def test_numeric_metadata_keys_are_the_same_request_as_form_or_json(api: Client) -> None:
    """stripe-python sends {"1": "x"} as metadata[1]=x: a hash, not a list."""
    key = str(uuid.uuid4())
    created = await api.post("/v1/payment_intents", {**VALID, "metadata[1]": "x",
                                                      "metadata[0]": "y"}, key=key)
    assert created.status == 202, created.body
    assert created.body["metadata"] == {"0": "y", "1": "x"}
    again = await api.post("/v1/payment_intents", key=key, json={
        "amount": 1000, "currency": "usd", "metadata": {"1": "x", "0": "y"}})
    assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.body["id"] == created.body["id"]
    applied = await api.wait_for(created.body["id"], ["requires_payment_method"])
    assert applied["metadata"] == {"0": "y", "1": "x"}


@pytest.mark.parametrize(("currency", "amount"), [
    ("usd", 50), ("gbp", 30), ("jpy", 50), ("krw", 700), ("kwd", 160), ("bhd", 190),
    ("isk", 6300), ("ugx", 190000), ("eur", 99_999_999), ("std", 1_100_000),
], ids=["usd", "gbp", "jpy", "krw", "kwd", "bhd", "isk", "ugx", "eur max", "std"])
async def test_smallest_amount_each_currency_takes(api: Client, currency: str,
                                                   amount: int) -> None:
    created = await api.create(amount=amount, currency=currency.upper())
    assert created.status == 202, created.body
    applied = await api.wait_for(created.body["id"], ["requires_payment_method"])
    assert (applied["amount"], applied["currency"]) == (amount, currency)


async def test_body_over_64_kib(api: Client, shared: Stack) -> None:
    key = str(uuid.uuid4())
    reply = await api.post("/v1/payment_intents", {**VALID, "description": "d" * 70_000},
                           key=key)
    assert_error(reply, 413, "request_too_large", None)
    await assert_key_still_works(api, shared, key)


async def test_gzip_body_that_is_not_gzip(api: Client, shared: Stack) -> None:
    """A body that does not match its Content-Encoding once escaped as a 500."""
    key = str(uuid.uuid4())
    # aiohttp closes the connection after a body it could not decode: ask for that up front.
    reply = await api.post("/v1/payment_intents", body=b"amount=100&currency=usd",
                           content_type=FORM, key=key,
                           headers={"Content-Encoding": "gzip", "Connection": "close"})
    assert_error(reply, 400, "invalid_request", None)
    await assert_key_still_works(api, shared, key)
    good = await api.post("/v1/payment_intents", body=gzip.compress(b"amount=700&currency=usd"),
                          content_type=FORM, headers={"Content-Encoding": "gzip"})
    assert good.status == 202 and good.body["amount"] == 700


# ---- create: the Idempotency-Key header --------------------------------------------------

@pytest.mark.parametrize(("key", "code"), [
    (None, "parameter_missing"),
    ("", "parameter_missing"),
    ("k" * 256, "parameter_invalid"),
    ("tab\tinside", "parameter_invalid"),
    ("ключ", "parameter_invalid"),
], ids=["missing", "empty", "256 chars", "control character", "not ascii"])
async def test_bad_idempotency_key(api: Client, shared: Stack, key: str | None,
                                   code: str) -> None:
    reply = await api.post("/v1/payment_intents", VALID, key=key)
    assert_error(reply, 400, code, "Idempotency-Key")
    if key:
        assert await shared.redis.exists(f"idem:{api.account_id}:{key}") == 0
    assert await count(api, "payment_intents") == 0
    assert await count(api, "inbox") == 0
    await assert_key_still_works(api, shared, str(uuid.uuid4()))


async def test_a_255_char_key_is_accepted(api: Client) -> None:
    created = await api.post("/v1/payment_intents", VALID, key="k" * 255)
    assert created.status == 202, created.body
    applied = await api.wait_for(created.body["id"], ["requires_payment_method"])
    assert applied["id"] == created.body["id"]


async def test_control_bytes_in_a_header_are_refused_by_the_http_parser(
    api: Client, shared: Stack
) -> None:
    """Only a TAB reaches the app (above); other control bytes end at aiohttp's parser with a
    plain 400, before any handler: still a 4xx, still nothing stored."""
    for byte in (b"\x01", b"\x7f"):
        status, _ = await raw_request(
            shared.base_url,
            b"POST /v1/payment_intents HTTP/1.1\r\nAuthorization: Bearer "
            + api.secret_key.encode() + b"\r\nIdempotency-Key: a" + byte + b"b\r\n"
            + f"Content-Type: {FORM}\r\n".encode(), b"amount=100&currency=usd")
        assert status == 400
    assert await count(api, "payment_intents") == 0
    assert await count(api, "inbox") == 0


# ---- authentication ------------------------------------------------------------------------

def basic(user: str) -> str:
    return "Basic " + base64.b64encode(user.encode()).decode()


@pytest.mark.parametrize(("auth", "code"), [
    (None, "api_key_missing"),
    ("", "api_key_missing"),
    ("Bearer sk_test_" + "x" * 40, "api_key_invalid"),
    ("Bearer ", "api_key_invalid"),
    ("Token sk_test_abc", "api_key_invalid"),
    ("Basic !!not-base64!!", "api_key_invalid"),
    (basic(":no-user"), "api_key_invalid"),
    ("publishable", "secret_key_required"),
], ids=["missing", "empty", "wrong key", "empty bearer", "other scheme", "bad basic",
        "basic without user", "publishable key"])
async def test_bad_authorization(api: Client, shared: Stack, auth: str | None,
                                 code: str) -> None:
    key = str(uuid.uuid4())
    if auth == "publishable":
        auth = f"Bearer {api.publishable_key}"
    reply = await api.post("/v1/payment_intents", VALID, key=key, auth=auth)
    assert_error(reply, 401, code, None)
    await assert_key_still_works(api, shared, key)


async def test_authorization_that_is_not_utf8(api: Client, shared: Stack) -> None:
    """Undecodable header bytes once made the key hash raise: a 500."""
    key = str(uuid.uuid4())
    status, response = await raw_request(
        shared.base_url,
        b"POST /v1/payment_intents HTTP/1.1\r\nAuthorization: Bearer sk_test_\xff\xfe\r\n"
        + f"Idempotency-Key: {key}\r\nContent-Type: {FORM}\r\n".encode(),
        b"amount=100&currency=usd")
    assert status == 401
    assert b"\r\nRequest-Id: req_" in response and b'"api_key_invalid"' in response
    await assert_key_still_works(api, shared, key)


@pytest.mark.parametrize("user", ["{key}", "{key}:"], ids=["user only", "user and colon"])
async def test_basic_auth_with_the_key_as_user_name(api: Client, user: str) -> None:
    created = await api.post("/v1/payment_intents", VALID,
                             auth=basic(user.format(key=api.secret_key)))
    assert created.status == 202, created.body
    fetched = await api.get(f"/v1/payment_intents/{created.body['id']}",
                            auth=basic(api.secret_key))
    assert fetched.status in (200, 425)


# ---- routes, methods, reads and state ----------------------------------------------------

@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/v1/foo", 404, "resource_missing"),
    ("POST", "/v1/payment_intents/pi_x/nope", 404, "resource_missing"),
    ("GET", "/nowhere", 404, "resource_missing"),
    ("DELETE", "/v1/payment_intents", 405, "method_not_allowed"),
    ("GET", "/v1/payment_intents/pi_x/capture", 405, "method_not_allowed"),
    ("PUT", "/v1/payment_intents/pi_x/confirm", 405, "method_not_allowed"),
], ids=["unknown v1 route", "unknown sub-route", "unknown route", "DELETE collection",
        "GET capture", "PUT confirm"])
async def test_unknown_route_and_method(api: Client, method: str, path: str, status: int,
                                        code: str) -> None:
    reply = await api.request(method, path)
    assert_error(reply, status, code, None)
    if status == 405:
        assert "POST" in reply.headers["Allow"]
    assert await count(api, "payment_intents") == 0


@pytest.mark.parametrize("intent_id", [
    "pi_" + "A" * 24, "pi_nope", "ch_" + "A" * 24, "pi_%00" + "A" * 23, "x" * 2000,
], ids=["well formed", "short", "other prefix", "NUL", "long"])
async def test_missing_intent(api: Client, shared: Stack, intent_id: str) -> None:
    """Ids that could never be ours, one with a NUL among them, are 404 on every route."""
    for method, path in [("GET", f"/v1/payment_intents/{intent_id}"),
                         ("GET", f"/v1/payment_intents/{intent_id}/charge")]:
        assert_error(await api.request(method, path), 404, "resource_missing", "intent")
    key = str(uuid.uuid4())
    confirm = await api.post(f"/v1/payment_intents/{intent_id}/confirm",
                             {"payment_method": "pm_card_visa"}, key=key)
    assert_error(confirm, 404, "resource_missing", "intent")
    assert await shared.redis.exists(f"idem:{api.account_id}:{key}") == 0
    assert await count(api, "inbox") == 0


async def test_confirm_of_a_succeeded_intent(api: Client, shared: Stack) -> None:
    created = await api.create(amount=1000, currency="usd", payment_method="pm_card_visa",
                               confirm=True)
    done = await api.wait_for(created.body["id"], ["succeeded"])
    key = str(uuid.uuid4())
    again = await api.post(f"/v1/payment_intents/{done['id']}/confirm",
                           {"payment_method": "pm_card_visa"}, key=key)
    assert_error(again, 400, "payment_intent_unexpected_state", None)
    assert await shared.redis.exists(f"idem:{api.account_id}:{key}") == 0
    assert await shared.redis.exists(pending_key(api.account_id, done["id"])) == 0
    assert (await api.get(f"/v1/payment_intents/{done['id']}")).body == done
    assert await api.db.fetchval("SELECT count(*) FROM payment_attempts "
                                 "WHERE payment_intent_id = $1", done["id"]) == 1
    assert await count(api, "inbox") == 1


@pytest.mark.parametrize(("how", "code", "param"), [
    ({"data": {"payment_method": "card_123"}}, "resource_missing", "payment_method"),
    ({"data": {"payment_method": "pm_card_visa", "amount": "5"}}, "parameter_unknown",
     "amount"),
    (raw_json("[]"), "invalid_request", None),
], ids=["payment_method card_123", "unknown parameter", "json array"])
async def test_bad_confirm_body(api: Client, shared: Stack, how: dict[str, Any], code: str,
                                param: str | None) -> None:
    created = await api.create(amount=1000, currency="usd")
    await api.wait_for(created.body["id"], ["requires_payment_method"])
    key = str(uuid.uuid4())
    reply = await api.post(f"/v1/payment_intents/{created.body['id']}/confirm", key=key, **how)
    assert_error(reply, 400, code, param)
    assert await shared.redis.exists(f"idem:{api.account_id}:{key}") == 0
    fetched = await api.get(f"/v1/payment_intents/{created.body['id']}")
    assert fetched.body["status"] == "requires_payment_method"
    ok = await api.post(f"/v1/payment_intents/{created.body['id']}/confirm",
                        {"payment_method": "pm_card_visa"}, key=key)
    assert ok.status == 202 and ok.body["status"] == "processing"


async def test_confirm_without_any_payment_method(api: Client, shared: Stack) -> None:
    created = await api.create(amount=1000, currency="usd")
    await api.wait_for(created.body["id"], ["requires_payment_method"])
    key = str(uuid.uuid4())
    reply = await api.post(f"/v1/payment_intents/{created.body['id']}/confirm", key=key)
    assert_error(reply, 400, "payment_intent_unexpected_state", "payment_method")
    assert await shared.redis.exists(f"idem:{api.account_id}:{key}") == 0
    assert await count(api, "inbox") == 1


@pytest.mark.parametrize(("query", "param"), [
    ("foo=1", "foo"), ("expand[0]=charge", "expand[0]"), ("%ff=1", "\ufffd"),
], ids=["foo", "expand", "undecodable"])
async def test_get_with_an_unknown_query_parameter(api: Client, query: str, param: str) -> None:
    created = await api.create(amount=1000, currency="usd")
    intent = await api.wait_for(created.body["id"], ["requires_payment_method"])
    for path in (f"/v1/payment_intents/{intent['id']}",
                 f"/v1/payment_intents/{intent['id']}/charge"):
        assert_error(await api.get(f"{path}?{query}"), 400, "parameter_unknown", param)
    assert (await api.get(f"/v1/payment_intents/{intent['id']}")).body == intent


# ---- request ids and errors the client did not cause ---------------------------------------

async def test_request_id_is_echoed_only_when_safe(api: Client, shared: Stack) -> None:
    mine = await api.post("/v1/payment_intents", VALID, headers={"X-Request-Id": "req_mine-1"})
    assert mine.status == 202 and mine.headers["Request-Id"] == "req_mine-1"
    # Undecodable bytes would break the command's encoding after the key was claimed.
    key = str(uuid.uuid4())
    status, response = await raw_request(
        shared.base_url,
        b"POST /v1/payment_intents HTTP/1.1\r\nAuthorization: Bearer "
        + api.secret_key.encode() + b"\r\nX-Request-Id: \xff\xfe\r\n"
        + f"Idempotency-Key: {key}\r\nContent-Type: {FORM}\r\n".encode(),
        b"amount=100&currency=usd")
    assert status == 202, response
    assert b"\r\nRequest-Id: req_" in response
    intent_id = ids.intent_id(shared.settings.secret_bytes, api.account_id, key)
    await api.wait_for(intent_id, ["requires_payment_method"])


async def test_internal_error_is_stripe_shaped_and_changes_nothing(
    api: Client, shared: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not the client's fault, but still the Stripe shape, a Request-Id, the key freed and no
    pending marker left behind (one once made the intent answer 425 for 24 hours)."""

    def broken(self: Any) -> bytes:
        raise RuntimeError("a bug")

    key = str(uuid.uuid4())
    # Client commands only: the processor's own messages must not break meanwhile.
    monkeypatch.setattr(ClientCommand, "encode", broken)
    reply = await api.post("/v1/payment_intents", VALID, key=key)
    assert_error(reply, 500, None, None, type_="api_error")
    intent_id = ids.intent_id(shared.settings.secret_bytes, api.account_id, key)
    assert_error(await api.get(f"/v1/payment_intents/{intent_id}"), 404, "resource_missing",
                 "intent")
    monkeypatch.undo()
    await assert_key_still_works(api, shared, key)


async def test_dependency_failure_is_503_and_safe_to_retry(
    api: Client, shared: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.intents

    async def down(*args: Any) -> Any:
        raise asyncpg.PostgresConnectionError("connection lost")

    key = str(uuid.uuid4())
    monkeypatch.setattr(edge.intents, "applied_before", down)
    reply = await api.post("/v1/payment_intents", VALID, key=key)
    assert_error(reply, 503, "service_unavailable", None, type_="api_error")
    assert reply.headers["Stripe-Should-Retry"] == "true"
    monkeypatch.undo()
    await assert_key_still_works(api, shared, key)
