"""Stablecoin payments (pm_crypto_usdc): the PSP answers once the transaction has its block
confirmations, without holding up other payments, and the charge carries the network, the
transaction hash and the confirmations."""

from __future__ import annotations

import pytest

from ops.settings import Settings, SettingsError
from processor.psp import transaction_hash
from tests.conftest import Client, make_settings, stack
from tests.support import VISA
from tests.test_refunds import charge_of, paid, refund, wait_refund

CRYPTO = "pm_crypto_usdc"

ATTEMPT = """
SELECT a.psp_key, p.authorization_code, p.outcome
FROM payment_attempts a JOIN psp.charges p ON p.idempotency_key = a.psp_key
WHERE a.payment_intent_id = $1
"""


async def check_settled(api: Client, intent_id: str, confirmations: int) -> dict[str, object]:
    charge = await charge_of(api, intent_id)
    attempts = await api.db.fetch(ATTEMPT, intent_id)
    assert len(attempts) == 1 and attempts[0]["outcome"] == "captured"
    tx = transaction_hash(attempts[0]["psp_key"])
    assert charge["status"] == "succeeded" and charge["paid"] is True
    details = charge["payment_method_details"]
    assert details["type"] == "crypto"
    assert details["crypto"] == {
        "buyer_address": None, "confirmations": confirmations, "network": "ethereum",
        "test_network": "sepolia", "token_currency": "usdc", "transaction_hash": tx}
    # The PSP's books hold the same transaction; a card's approval code is not made up.
    assert attempts[0]["authorization_code"] == f"{tx}:{confirmations}"
    assert charge["authorization_code"] is None
    return charge


async def test_a_stablecoin_payment_settles_with_its_confirmations(api: Client) -> None:
    intent = await paid(api, 2500, CRYPTO)
    assert intent["amount_received"] == 2500
    charge = await check_settled(api, intent["id"], 3)
    # Refunded as any other charge.
    accepted = await refund(api, charge=charge["id"], amount=1000)
    assert accepted.status == 202, accepted.body
    assert (await wait_refund(api, accepted.body["id"]))["status"] == "succeeded"
    assert (await charge_of(api, intent["id"]))["amount_refunded"] == 1000


async def test_waiting_for_confirmations_holds_up_nothing_else(migrated: None) -> None:
    """Confirmations that take longer than one PSP call: the call is retried with the same key
    and goes on waiting for the same transaction (one payment at the PSP), while a card
    payment made after it settles first."""
    settings = make_settings(psp_crypto_confirmations=4, psp_crypto_block_time_s=0.5)
    async with stack(settings) as s:
        api = await s.client()
        slow = await api.create(amount=1800, currency="usd", payment_method=CRYPTO,
                                confirm=True)
        fast = await api.create(amount=900, currency="usd", payment_method=VISA, confirm=True)
        assert (slow.status, fast.status) == (202, 202)
        await api.wait_for(fast.body["id"], ["succeeded"])
        pending = await api.get(f"/v1/payment_intents/{slow.body['id']}")
        assert pending.body["status"] == "processing"
        charge = await api.get(f"/v1/payment_intents/{slow.body['id']}/charge")
        assert charge.status == 425
        done = await api.wait_for(slow.body["id"], ["succeeded"])
        assert done["amount_received"] == 1800
        await check_settled(api, slow.body["id"], 4)


@pytest.mark.parametrize(("env", "named"), [
    ({"PAYONCE_PSP_CRYPTO_CONFIRMATIONS": "0"}, "PAYONCE_PSP_CRYPTO_CONFIRMATIONS"),
    ({"PAYONCE_PSP_CRYPTO_BLOCK_TIME_S": "0"}, "PAYONCE_PSP_CRYPTO_BLOCK_TIME_S"),
    ({"PAYONCE_PSP_CRYPTO_CONFIRMATIONS": "100", "PAYONCE_PSP_CRYPTO_BLOCK_TIME_S": "1",
      "PAYONCE_PSP_MAX_TRIES": "3", "PAYONCE_PSP_TIMEOUT_S": "10"},
     "PAYONCE_PSP_MAX_TRIES x PAYONCE_PSP_TIMEOUT_S"),
])
def test_confirmations_must_fit_in_an_attempt(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)

