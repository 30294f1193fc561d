"""A publishable key (`pk_test_…`) retrieves a PaymentIntent with its client_secret, as
Stripe.js does, and sees only the fields Stripe shows it; it can do nothing else."""

from __future__ import annotations

import pytest

from contracts import ids
from edge.intents import PUBLISHABLE_FIELDS
from tests.conftest import Client, Stack, stack
from tests.stripe_schema import fixture_fields
from tests.support import VISA

MERCHANT_ONLY = {"metadata", "customer", "amount_received", "amount_capturable",
                 "latest_charge", "application_fee_amount", "statement_descriptor"}


def pk(api: Client) -> str:
    return f"Bearer {api.publishable_key}"


async def settled(api: Client) -> dict[str, object]:
    created = await api.create(amount=2500, currency="usd", payment_method=VISA, confirm=True,
                               description="order 42", customer="cus_123",
                               metadata={"order": "42"})
    return await api.wait_for(created.body["id"], ["succeeded"])


async def test_retrieve_with_client_secret(api: Client) -> None:
    intent = await settled(api)
    path = f"/v1/payment_intents/{intent['id']}?client_secret={intent['client_secret']}"
    reply = await api.get(path, auth=pk(api))
    assert reply.status == 200, reply.body
    # The Client held it to Stripe's PaymentIntent schema, whose required fields are all
    # among those a publishable key sees.
    assert set(reply.body) == set(PUBLISHABLE_FIELDS) & set(intent)
    assert not MERCHANT_ONLY & set(reply.body)
    assert {k: intent[k] for k in reply.body} == reply.body
    assert reply.body["status"] == "succeeded" and reply.body["description"] == "order 42"
    assert set(PUBLISHABLE_FIELDS) <= fixture_fields("payment_intent")
    # The same with a long-poll: nothing is under way, so at once.
    waited = await api.get(path + "&wait=5", auth=pk(api))
    assert waited.status == 200 and waited.body == reply.body


async def test_a_secret_key_may_name_the_client_secret(api: Client) -> None:
    intent = await settled(api)
    full = await api.get(f"/v1/payment_intents/{intent['id']}"
                         f"?client_secret={intent['client_secret']}")
    assert full.status == 200 and full.body == intent
    wrong = await api.get(f"/v1/payment_intents/{intent['id']}"
                          f"?client_secret={intent['id']}_secret_{'x' * 25}")
    assert wrong.status == 400 and wrong.error["param"] == "client_secret"


async def test_a_publishable_key_needs_the_client_secret(api: Client) -> None:
    intent = await settled(api)
    reply = await api.get(f"/v1/payment_intents/{intent['id']}", auth=pk(api))
    assert reply.status == 400
    assert reply.error["code"] == "parameter_missing"
    assert reply.error["param"] == "client_secret"


@pytest.mark.parametrize("which", ["tampered", "other intent", "not a secret", "empty tail"])
async def test_a_wrong_client_secret(api: Client, which: str) -> None:
    intent = await settled(api)
    other = await api.create(amount=1000, currency="usd")
    secret = str(intent["client_secret"])
    candidate = {
        "tampered": secret[:-1] + ("y" if secret.endswith("x") else "x"),
        "other intent": other.body["client_secret"],
        "not a secret": "hello",
        "empty tail": f"{intent['id']}_secret_",
    }[which]
    reply = await api.get(f"/v1/payment_intents/{intent['id']}?client_secret={candidate}",
                          auth=pk(api))
    assert reply.status == 400, reply.body
    assert reply.error["code"] == "payment_intent_invalid_parameter"
    assert reply.error["param"] == "client_secret"
    assert reply.error["message"] == ("The client_secret provided does not match the "
                                      "client_secret associated with the PaymentIntent.")


async def test_another_accounts_intent(api: Client, shared: Stack) -> None:
    intent = await settled(api)
    stranger = await shared.client()
    reply = await api.get(f"/v1/payment_intents/{intent['id']}"
                          f"?client_secret={intent['client_secret']}", auth=pk(stranger))
    assert reply.status == 404
    assert reply.error["code"] == "resource_missing"
    assert "does not match any associated PaymentIntent on this account" in \
        reply.error["message"]
    # Its secret key is no better.
    assert (await stranger.get(f"/v1/payment_intents/{intent['id']}")).status == 404


async def test_an_intent_not_applied_yet(migrated: None) -> None:
    async with stack(processor=False) as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd")
        secret = created.body["client_secret"]
        assert ids.client_secret_matches(s.settings.secret_bytes, secret)
        reply = await api.get(f"/v1/payment_intents/{created.body['id']}?client_secret={secret}",
                              auth=pk(api))
        assert reply.status == 425 and reply.error["code"] == "resource_not_ready"


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/payment_intents"),
    ("POST", "/v1/payment_intents/{id}/confirm"),
    ("GET", "/v1/payment_intents/{id}/charge"),
    ("GET", "/v1/payment_intents/{id}/timeline"),
    ("GET", "/v1/events"),
    ("GET", "/v1/webhook_endpoints"),
    ("POST", "/v1/webhook_endpoints"),
])
async def test_nothing_else_takes_a_publishable_key(api: Client, method: str,
                                                    path: str) -> None:
    intent = await settled(api)
    target = path.format(id=intent["id"])
    if method == "GET":
        target += f"?client_secret={intent['client_secret']}"
    reply = await api.request(method, target, auth=pk(api),
                              data={"client_secret": str(intent["client_secret"])})
    assert reply.status == 401
    assert reply.error["code"] == "secret_key_required"
    assert reply.error["message"] == ("This API call cannot be made with a publishable API "
                                      "key. Use a secret API key.")
