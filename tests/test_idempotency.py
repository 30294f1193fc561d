"""Idempotency: a POST with a given (account, Idempotency-Key) takes effect once.

Redis answers retries fast (replay, 400 on a different request, 409 while in flight); the
Postgres inbox is the authority when Redis has forgotten a key.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest

from contracts import ids
from edge import intents, params
from edge.accept import unavailable
from edge.idempotency import Claim, IdempotencyStore, fingerprint
from tests.conftest import Client, Reply, Stack, stack

CREATE = "/v1/payment_intents"


async def post_raw(api: Client, path: str, key: str, *, data: Any = None,
                   json: Any = None) -> tuple[int, bytes, Any]:
    """(status, body bytes exactly as sent, headers)."""
    headers = {"Authorization": f"Bearer {api.secret_key}", "Idempotency-Key": key}
    async with api.session.post(api.base_url + path, data=data, json=json,
                                headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers


async def count(api: Client, table: str) -> int:
    return int(await api.db.fetchval(
        f"SELECT count(*) FROM {table} WHERE account_id = $1", api.account_id))


def redis_key(api: Client, key: str) -> str:
    return f"idem:{api.account_id}:{key}"


def assert_idempotency_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply.body
    assert reply.error["type"] == "idempotency_error"
    assert reply.error["code"] == code
    assert reply.error["message"] and reply.headers["Request-Id"]


async def test_finished_request_is_replayed_byte_for_byte(api: Client) -> None:
    key = str(uuid.uuid4())
    form = {"amount": "2000", "currency": "usd", "metadata[order]": "42",
            "payment_method": "pm_card_visa", "confirm": "true"}
    status, body, headers = await post_raw(api, CREATE, key, data=form)
    assert status == 202 and "Idempotent-Replayed" not in headers
    # The intent moves on; a replay still answers what the first request answered.
    await api.wait_for(orjson.loads(body)["id"], ["succeeded"])
    again = await post_raw(api, CREATE, key, data=form)
    assert (again[0], again[1]) == (202, body)
    assert again[2]["Idempotent-Replayed"] == "true"
    assert again[2]["Request-Id"] != headers["Request-Id"]
    # The same parameters as JSON are the same request.
    as_json = await post_raw(api, CREATE, key, json={
        "amount": 2000, "currency": "USD", "metadata": {"order": 42},
        "payment_method": "pm_card_visa", "confirm": True})
    assert (as_json[0], as_json[1]) == (202, body)
    assert as_json[2]["Idempotent-Replayed"] == "true"
    assert await count(api, "payment_intents") == 1
    assert await count(api, "inbox") == 1
    assert await count(api, "payment_attempts") == 1


async def test_same_key_different_request_is_refused(api: Client, shared: Stack) -> None:
    key = str(uuid.uuid4())
    created = await api.post(CREATE, {"amount": "1000", "currency": "usd"}, key=key)
    assert created.status == 202
    intent = await api.wait_for(created.body["id"], ["requires_payment_method"])
    for other in ({"amount": "1001", "currency": "usd"},
                  {"amount": "1000", "currency": "usd", "description": "x"},
                  {"amount": "1000", "currency": "eur"}):
        reply = await api.post(CREATE, other, key=key)
        assert_idempotency_error(reply, 400, "idempotency_key_reused")
        assert reply.error["param"] == "Idempotency-Key"
    # The same key on another endpoint is another request too.
    confirm = await api.post(f"/v1/payment_intents/{intent['id']}/confirm",
                             {"payment_method": "pm_card_visa"}, key=key)
    assert_idempotency_error(confirm, 400, "idempotency_key_reused")
    assert (await api.get(f"/v1/payment_intents/{intent['id']}")).body == intent
    assert await count(api, "payment_intents") == 1
    assert await count(api, "inbox") == 1
    assert await shared.redis.exists(f"pending:{api.account_id}:{intent['id']}") == 0
    replay = await api.post(CREATE, {"amount": "1000", "currency": "usd"}, key=key)
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"


async def test_same_key_in_flight_is_409_then_released(api: Client, shared: Stack) -> None:
    key = str(uuid.uuid4())
    raw = {"amount": "1000", "currency": "usd"}
    # Another edge, alive (its heartbeat is fresh), holds the key.
    store = IdempotencyStore(shared.redis, ttl_s=shared.settings.idempotency_ttl_s,
                             lock_ms=shared.settings.idempotency_lock_ms,
                             owner=f"test-{uuid.uuid4()}")
    await store.heartbeat(60_000)
    fp = fingerprint("POST", CREATE, params.create_intent(raw))
    claim = await store.claim(api.account_id, key, fp)
    assert isinstance(claim, Claim)
    # A dead holder frees the key: the in-flight record expires within the lock time.
    assert 0 < await shared.redis.pttl(claim.redis_key) <= shared.settings.idempotency_lock_ms

    busy = await api.post(CREATE, raw, key=key)
    assert_idempotency_error(busy, 409, "idempotency_key_in_use")
    assert busy.headers["Stripe-Should-Retry"] == "true"
    # A different request under a key in flight is not the same request.
    other = await api.post(CREATE, {**raw, "amount": "500"}, key=key)
    assert_idempotency_error(other, 400, "idempotency_key_reused")
    intent_id = ids.intent_id(shared.settings.secret_bytes, api.account_id, key)
    assert await shared.redis.exists(f"pending:{api.account_id}:{intent_id}") == 0
    assert await shared.redis.get(claim.redis_key) == claim.record

    await store.release(claim)
    await store.retire()
    created = await api.post(CREATE, raw, key=key)
    assert created.status == 202 and "Idempotent-Replayed" not in created.headers
    assert created.body["id"] == intent_id
    await api.wait_for(intent_id, ["requires_payment_method"])
    assert await count(api, "payment_intents") == 1


async def test_key_of_a_dead_edge_is_taken_over(api: Client, shared: Stack) -> None:
    """An edge that died mid-request leaves its key in flight until the lock expires; once its
    liveness key has lapsed, the next retry takes the key over instead of waiting."""
    key = str(uuid.uuid4())
    raw = {"amount": "1000", "currency": "usd"}
    dead = IdempotencyStore(shared.redis, ttl_s=shared.settings.idempotency_ttl_s,
                            lock_ms=shared.settings.idempotency_lock_ms,
                            owner=f"test-{uuid.uuid4()}")
    await dead.heartbeat(60_000)
    fp = fingerprint("POST", CREATE, params.create_intent(raw))
    claim = await dead.claim(api.account_id, key, fp)
    assert isinstance(claim, Claim)
    assert_idempotency_error(await api.post(CREATE, raw, key=key), 409, "idempotency_key_in_use")

    await dead.retire()  # what the heartbeat's expiry does for an edge killed with -9
    assert await shared.redis.pttl(claim.redis_key) > 1000  # the lock itself is far from over
    # Another request under the key is still not the same request.
    other = await api.post(CREATE, {**raw, "amount": "500"}, key=key)
    assert_idempotency_error(other, 400, "idempotency_key_reused")
    taken = await api.post(CREATE, raw, key=key)
    assert taken.status == 202, taken.body
    assert taken.body["id"] == ids.intent_id(shared.settings.secret_bytes, api.account_id, key)
    # The dead request can no longer finish or release what is not its own any more.
    await dead.finish(claim, fp, 500, b"{}")
    await dead.release(claim)
    replay = await api.post(CREATE, raw, key=key)
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"
    await api.wait_for(taken.body["id"], ["requires_payment_method"])
    assert await count(api, "payment_intents") == 1


async def test_keys_are_scoped_to_the_account(shared: Stack) -> None:
    a, b, c = await shared.client(), await shared.client(), await shared.client()
    key = str(uuid.uuid4())
    in_a = await a.post(CREATE, {"amount": "1000", "currency": "usd"}, key=key)
    in_b = await b.post(CREATE, {"amount": "1000", "currency": "usd"}, key=key)
    # Another request under the same key is no mismatch in another account either.
    in_c = await c.post(CREATE, {"amount": "700", "currency": "eur"}, key=key)
    assert in_a.status == in_b.status == in_c.status == 202
    assert not any("Idempotent-Replayed" in r.headers for r in (in_a, in_b, in_c))
    assert len({in_a.body["id"], in_b.body["id"], in_c.body["id"]}) == 3
    for api, reply in ((a, in_a), (b, in_b), (c, in_c)):
        applied = await api.wait_for(reply.body["id"], ["requires_payment_method"])
        assert applied["amount"] == reply.body["amount"]
        assert await count(api, "payment_intents") == 1


async def test_an_account_cannot_see_or_change_another_accounts_intent(shared: Stack) -> None:
    a, b = await shared.client(), await shared.client()
    created = await a.create(amount=1000, currency="usd", payment_method="pm_card_visa",
                             confirm=True)
    intent = await a.wait_for(created.body["id"], ["succeeded"])
    other = await a.create(amount=500, currency="usd", payment_method="pm_card_visa")
    pending = await a.wait_for(other.body["id"], ["requires_confirmation"])
    for target in (intent, pending):
        for path in (f"/v1/payment_intents/{target['id']}",
                     f"/v1/payment_intents/{target['id']}/charge"):
            reply = await b.get(path)
            assert reply.status == 404 and reply.error["code"] == "resource_missing"
        confirm = await b.post(f"/v1/payment_intents/{target['id']}/confirm",
                               {"payment_method": "pm_card_visa"})
        assert confirm.status == 404 and confirm.error["code"] == "resource_missing"
        assert (await a.get(f"/v1/payment_intents/{target['id']}")).body == target
    assert await a.db.fetchval("SELECT count(*) FROM payment_attempts "
                               "WHERE payment_intent_id = ANY($1::text[])",
                               [intent["id"], pending["id"]]) == 1
    assert await count(b, "inbox") == 0


def assert_one_execution(replies: list[Reply]) -> Reply:
    """Every answer is 202 or 409; one 202 executed, the others replay it."""
    assert {r.status for r in replies} <= {202, 409}, [(r.status, r.body) for r in replies]
    accepted = [r for r in replies if r.status == 202]
    executed = [r for r in accepted if "Idempotent-Replayed" not in r.headers]
    assert len(executed) == 1
    assert {r.body["id"] for r in accepted} == {executed[0].body["id"]}
    assert all(r.body == executed[0].body for r in accepted)
    for busy in (r for r in replies if r.status == 409):
        assert busy.error["code"] == "idempotency_key_in_use"
        assert busy.headers["Stripe-Should-Retry"] == "true"
    return executed[0]


async def test_concurrent_identical_creates_make_one_intent(shared: Stack) -> None:
    for _ in range(5):
        api = await shared.client()
        key = str(uuid.uuid4())
        replies = await asyncio.gather(*[
            api.post(CREATE, {"amount": "1000", "currency": "usd"}, key=key)
            for _ in range(50)])
        executed = assert_one_execution(list(replies))
        await api.wait_for(executed.body["id"], ["requires_payment_method"])
        assert await count(api, "payment_intents") == 1
        assert await count(api, "inbox") == 1
        assert await api.db.fetchval(
            "SELECT count(*) FROM events WHERE object_id = $1 AND type = $2",
            executed.body["id"], "payment_intent.created") == 1


async def attempts_of(api: Client, intent_id: str) -> list[Any]:
    return list(await api.db.fetch(
        "SELECT a.id, a.psp_key, (SELECT count(*) FROM psp.charges p "
        "WHERE p.idempotency_key = a.psp_key) AS psp_charges "
        "FROM payment_attempts a WHERE a.payment_intent_id = $1", intent_id))


async def test_concurrent_identical_confirms_make_one_payment(shared: Stack) -> None:
    for _ in range(3):
        api = await shared.client()
        created = await api.create(amount=1000, currency="usd", payment_method="pm_card_visa")
        intent_id = created.body["id"]
        await api.wait_for(intent_id, ["requires_confirmation"])
        key = str(uuid.uuid4())
        replies = await asyncio.gather(*[
            api.post(f"/v1/payment_intents/{intent_id}/confirm", key=key) for _ in range(50)])
        executed = assert_one_execution(list(replies))
        assert executed.body["status"] == "processing"
        done = await api.wait_for(intent_id, ["succeeded"])
        attempts = await attempts_of(api, intent_id)
        assert len(attempts) == 1 and attempts[0]["psp_charges"] == 1
        assert await api.db.fetchval(
            "SELECT count(*) FROM charges WHERE payment_intent_id = $1", intent_id) == 1
        assert done["amount_received"] == 1000


async def test_concurrent_confirms_with_different_keys_pay_once(api: Client) -> None:
    """Not the same request, but the state machine still allows one payment."""
    created = await api.create(amount=1000, currency="usd", payment_method="pm_card_visa")
    intent_id = created.body["id"]
    await api.wait_for(intent_id, ["requires_confirmation"])
    replies = await asyncio.gather(*[
        api.post(f"/v1/payment_intents/{intent_id}/confirm") for _ in range(50)])
    assert {r.status for r in replies} <= {202, 400}, [(r.status, r.body) for r in replies]
    assert any(r.status == 202 for r in replies)
    for refused in (r for r in replies if r.status == 400):
        assert refused.error["code"] == "payment_intent_unexpected_state"
    await api.wait_for(intent_id, ["succeeded"])
    # Confirms the edge accepted before it saw the first are rejected by the processor.
    accepted = sum(r.status == 202 for r in replies)
    async with asyncio.timeout(20):
        while await count(api, "inbox") < 1 + accepted:
            await asyncio.sleep(0.05)
    attempts = await attempts_of(api, intent_id)
    assert len(attempts) == 1 and attempts[0]["psp_charges"] == 1
    assert (await api.get(f"/v1/payment_intents/{intent_id}")).body["status"] == "succeeded"


async def test_redis_forgets_after_the_intent_was_applied(api: Client, shared: Stack) -> None:
    key = str(uuid.uuid4())
    created = await api.post(CREATE, {"amount": "1000", "currency": "usd"}, key=key)
    intent = await api.wait_for(created.body["id"], ["requires_payment_method"])
    await shared.redis.delete(redis_key(api, key))

    retry = await api.post(CREATE, {"amount": "1000", "currency": "usd"}, key=key)
    assert retry.status == 202
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.body == intent  # answered from Postgres: the intent as it is now
    assert await count(api, "payment_intents") == 1
    assert await count(api, "inbox") == 1
    # The claim wrote the create's pending marker; answered from Postgres, nothing was
    # published, and the marker is gone.
    assert await shared.redis.exists(f"pending:{api.account_id}:{intent['id']}") == 0

    await shared.redis.delete(redis_key(api, key))
    other = await api.post(CREATE, {"amount": "999", "currency": "usd"}, key=key)
    assert_idempotency_error(other, 400, "idempotency_key_reused")
    assert await shared.redis.exists(redis_key(api, key)) == 0
    assert await shared.redis.exists(f"pending:{api.account_id}:{intent['id']}") == 0
    assert (await api.get(f"/v1/payment_intents/{intent['id']}")).body == intent
    assert await count(api, "payment_intents") == 1
    assert await count(api, "inbox") == 1


async def test_redis_forgets_a_confirm_after_it_was_applied(api: Client,
                                                            shared: Stack) -> None:
    created = await api.create(amount=1000, currency="usd", payment_method="pm_card_visa")
    intent_id = created.body["id"]
    await api.wait_for(intent_id, ["requires_confirmation"])
    key = str(uuid.uuid4())
    path = f"/v1/payment_intents/{intent_id}/confirm"
    first = await api.post(path, key=key)
    assert first.status == 202
    await api.wait_for(intent_id, ["succeeded"])
    await shared.redis.delete(redis_key(api, key))
    retry = await api.post(path, key=key)
    assert retry.status == 202 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.body["status"] == "succeeded"
    assert len(await attempts_of(api, intent_id)) == 1


async def test_redis_forgets_before_the_command_is_applied(migrated: None) -> None:
    async with stack(processor=False) as s:
        api = await s.client()
        key = str(uuid.uuid4())
        body = {"amount": "1000", "currency": "usd"}
        created = await api.post(CREATE, body, key=key)
        assert created.status == 202
        intent_id = created.body["id"]
        await s.redis.delete(redis_key(api, key))
        retry = await api.post(CREATE, body, key=key)
        assert retry.status == 202, retry.body
        assert retry.body["id"] == intent_id
        assert (await api.get(f"/v1/payment_intents/{intent_id}")).status == 425
        # Commands of one intent are applied in order: once this confirm is, both copies of
        # the create have been through the processor.
        confirm = await api.post(f"/v1/payment_intents/{intent_id}/confirm",
                                 {"payment_method": "pm_card_visa"})
        assert confirm.status == 202, confirm.body
        await s.start_processor()
        await api.wait_for(intent_id, ["succeeded"])
        assert await count(api, "payment_intents") == 1
        assert await api.db.fetchval(
            "SELECT count(*) FROM inbox WHERE account_id = $1 AND idempotency_key = $2",
            api.account_id, key) == 1
        assert await count(api, "inbox") == 2  # the create and the confirm
        assert await api.db.fetchval(
            "SELECT count(*) FROM events WHERE object_id = $1 AND type = $2",
            intent_id, "payment_intent.created") == 1
        assert len(await attempts_of(api, intent_id)) == 1


async def test_a_creates_marker_comes_with_its_claim_and_goes_if_nothing_is_published(
    migrated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create claims its key and writes its pending marker in one round trip, and the marker
    is marked queued with the stored answer. A create that fails between the two (here the
    inbox check) leaves neither marker nor claim behind."""
    async with stack(processor=False) as s:
        api = await s.client()
        key = str(uuid.uuid4())
        body = {"amount": "1000", "currency": "usd"}
        created = await api.post(CREATE, body, key=key)
        assert created.status == 202
        marker = f"pending:{api.account_id}:{created.body['id']}"
        _, deadline, obj = (await s.redis.hget(marker, key)).split(b":", 2)
        assert deadline == b"0"  # queued: it stands until the processor applies the create
        assert orjson.loads(obj) == created.body

        async def down(*args: Any, **kw: Any) -> None:
            raise unavailable("postgres", ConnectionError("test"))

        monkeypatch.setattr(intents, "applied_before", down)
        key = str(uuid.uuid4())
        failed = await api.post(CREATE, body, key=key)
        assert failed.status == 503, failed.body
        intent_id = ids.intent_id(s.settings.secret_bytes, api.account_id, key)
        assert await s.redis.hget(f"pending:{api.account_id}:{intent_id}", key) is None
        assert await s.redis.exists(redis_key(api, key)) == 0
        assert (await api.get(f"/v1/payment_intents/{intent_id}")).status == 404
        monkeypatch.undo()
        again = await api.post(CREATE, body, key=key)
        assert again.status == 202 and again.body["id"] == intent_id
        assert "Idempotent-Replayed" not in again.headers


async def test_validation_failure_does_not_burn_the_key(api: Client, shared: Stack) -> None:
    key = str(uuid.uuid4())
    bad = await api.post(CREATE, {"amount": "abc", "currency": "usd"}, key=key)
    assert bad.status == 400 and bad.error["code"] == "parameter_invalid_integer"
    assert await shared.redis.exists(redis_key(api, key)) == 0
    good = await api.post(CREATE, {"amount": "1000", "currency": "usd"}, key=key)
    assert good.status == 202 and "Idempotent-Replayed" not in good.headers
    again = await api.post(CREATE, {"amount": "1000", "currency": "usd"}, key=key)
    assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.body == good.body


async def test_answers_are_kept_24_hours(api: Client, shared: Stack) -> None:
    key = str(uuid.uuid4())
    created = await api.post(CREATE, {"amount": "1000", "currency": "usd"}, key=key)
    assert created.status == 202
    ttl = await shared.redis.ttl(redis_key(api, key))
    assert 24 * 3600 - 60 <= ttl <= 24 * 3600
    # A key Redis forgot and Postgres answered is kept as long again.
    await api.wait_for(created.body["id"], ["requires_payment_method"])
    await shared.redis.delete(redis_key(api, key))
    assert (await api.post(CREATE, {"amount": "1000", "currency": "usd"}, key=key)).status == 202
    assert 24 * 3600 - 60 <= await shared.redis.ttl(redis_key(api, key)) <= 24 * 3600


async def test_after_redis_lost_its_data_unknown_intents_are_not_ready(
    migrated: None
) -> None:
    """Redis lost the markers of creates accepted and not applied yet: an intent nobody knows
    may be one of them, so for a while it is "not ready, retry", never "does not exist"."""
    async with stack(processor=False) as s:
        api = await s.client()
        unknown = f"/v1/payment_intents/pi_{'Z' * 24}"
        assert (await api.get(unknown)).status == 404
        # What FLUSHALL or a restart without persistence does to the deployment's epoch.
        await s.redis.delete(f"epoch:{s.settings.amqp_prefix}")
        read = await api.get(unknown)
        assert read.status == 425 and read.headers["Retry-After"]
        confirm = await api.post(f"{unknown}/confirm", {"payment_method": "pm_card_visa"})
        assert confirm.status == 425 and confirm.headers["Stripe-Should-Retry"] == "true"
        assert (await api.get(f"{unknown}/charge")).status == 425
        # Ids that contracts/ids.py cannot have made are still plain 404s.
        assert (await api.get("/v1/payment_intents/pi_short")).status == 404
