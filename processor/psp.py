"""The PSP adapter, and the simulator behind it.

The simulator behaves as a real PSP does for what payonce relies on: it keeps its own books
(schema `psp`), dedupes on the idempotency key (a retry with the same key gets the first
answer, never a second charge), answers after a network-like latency, and fails at
configurable rates: declines, 5xx errors, and timeouts before or after it committed the charge.
Stripe's test payment methods decide the outcome deterministically.

Refunds are kept against the charge they return money from, never beyond it. A refund of
Stripe's refundFail card succeeds, then fails `psp_refund_fail_after_s` later: until then its
answer is not final, and asking again with the same key tells how it ended.

A stablecoin payment (objects.CRYPTO_METHODS) is answered once its transaction has
`psp_crypto_confirmations` confirmations, a block every `psp_crypto_block_time_s` after it was
broadcast (when the charge was first asked for); a retry with the same key waits for the same
transaction. The answer's authorization code is the transaction's settlement reference.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from contracts.objects import CRYPTO_METHODS, crypto_reference
from ops.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PSPResult:
    succeeded: bool
    authorization_code: str | None = None
    failure_code: str | None = None
    decline_code: str | None = None
    failure_message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PSPResult:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class PSPRefundResult:
    status: str  # succeeded, failed
    failure_reason: str | None = None
    # False while the PSP may still fail a refund it reports succeeded.
    final: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PSPRefundResult:
        return cls(**data)


class PSPError(Exception):
    """Base of the PSP adapter's errors."""


class PSPUnavailable(PSPError):
    """The PSP answered 5xx or could not be reached: nothing was charged, safe to retry."""


class PSPTimeout(PSPError):
    """No answer in time: the charge may or may not exist; retry with the same key."""


class PSPRejected(PSPError):
    """The PSP refused the request itself (4xx): retrying it cannot succeed."""


class PSP(Protocol):
    async def charge(
        self, key: str, *, amount: int, currency: str, payment_method: str
    ) -> PSPResult: ...

    async def lookup(self, key: str) -> PSPResult | None: ...


def _declined(code: str, decline: str, message: str) -> PSPResult:
    return PSPResult(False, failure_code=code, decline_code=decline, failure_message=message)


_DECLINED = "Your card was declined."
TEST_PAYMENT_METHODS: dict[str, PSPResult | None] = {
    "pm_card_visa": None,
    "pm_card_mastercard": None,
    "pm_card_amex": None,
    "pm_card_visa_chargeDeclined": _declined("card_declined", "generic_decline", _DECLINED),
    "pm_card_visa_chargeDeclinedInsufficientFunds": _declined(
        "card_declined", "insufficient_funds", "Your card has insufficient funds."),
    "pm_card_visa_chargeDeclinedLostCard": _declined("card_declined", "lost_card", _DECLINED),
    "pm_card_visa_chargeDeclinedStolenCard": _declined("card_declined", "stolen_card", _DECLINED),
    "pm_card_chargeDeclinedExpiredCard": _declined(
        "expired_card", "expired_card", "Your card has expired."),
    "pm_card_chargeDeclinedIncorrectCvc": _declined(
        "incorrect_cvc", "incorrect_cvc", "Your card's security code is incorrect."),
    "pm_card_chargeDeclinedProcessingError": _declined(
        "processing_error", "processing_error",
        "An error occurred while processing your card. Try again in a little bit."),
    "pm_card_visa_chargeDeclinedVelocityLimitExceeded": _declined(
        "card_declined", "card_velocity_exceeded",
        "Your card was declined for making repeated attempts too frequently or exceeding its "
        "amount limit."),
}

INSERT_CHARGE = """
INSERT INTO psp.charges (idempotency_key, request_hash, amount, currency, payment_method,
                         outcome, authorization_code, failure_code, decline_code, failure_message)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING *
"""
FETCH_CHARGE = "SELECT * FROM psp.charges WHERE idempotency_key = $1"
# Refunds of one charge are decided one at a time, under the charge's lock.
LOCK_CHARGE = "SELECT * FROM psp.charges WHERE idempotency_key = $1 FOR UPDATE"
FETCH_REFUND = "SELECT * FROM psp.refunds WHERE idempotency_key = $1"
REFUNDED = """
SELECT coalesce(sum(amount), 0) FROM psp.refunds WHERE charge_key = $1 AND status = 'succeeded'
"""
INSERT_REFUND = """
INSERT INTO psp.refunds (idempotency_key, charge_key, request_hash, amount, status, fails_at)
VALUES ($1, $2, $3, $4, 'succeeded', $5)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING *
"""
# The refund fails when its time comes, the first time it is asked about after that.
FAIL_DUE_REFUND = """
UPDATE psp.refunds SET status = 'failed', failure_reason = $2
WHERE idempotency_key = $1 AND status = 'succeeded' AND fails_at <= now()
RETURNING *
"""
REFUND_FAILS = "pm_card_refundFail"
# What Stripe's refundFail card's refunds fail with.
REFUND_FAILURE = "expired_or_canceled_card"


def _result(row: Any) -> PSPResult:
    return PSPResult(
        succeeded=row["outcome"] == "captured",
        authorization_code=row["authorization_code"],
        failure_code=row["failure_code"],
        decline_code=row["decline_code"],
        failure_message=row["failure_message"],
    )


def _refund_result(row: Any) -> PSPRefundResult:
    return PSPRefundResult(row["status"], failure_reason=row["failure_reason"],
                           final=row["status"] == "failed" or row["fails_at"] is None)


def transaction_hash(key: str) -> str:
    """The simulated chain's hash of the transaction a payment with this key broadcast."""
    return "0x" + hashlib.sha256(f"tx\x1f{key}".encode()).hexdigest()


class SimulatedPSP:
    def __init__(self, pool: Any, settings: Settings, rng: random.Random | None = None) -> None:
        self._pool = pool
        self._settings = settings
        self._rng = rng or random.Random()

    async def _latency(self) -> None:
        low, high = self._settings.psp_latency_ms
        await asyncio.sleep(self._rng.uniform(low, high) / 1000)

    def _decide(self, key: str, payment_method: str) -> PSPResult:
        if payment_method in CRYPTO_METHODS:
            reference = crypto_reference(transaction_hash(key),
                                         self._settings.psp_crypto_confirmations)
            return PSPResult(True, authorization_code=reference)
        if payment_method in TEST_PAYMENT_METHODS:
            outcome = TEST_PAYMENT_METHODS[payment_method]
        elif self._rng.random() < self._settings.psp_decline_rate:
            outcome = _declined("card_declined", "generic_decline", _DECLINED)
        else:
            outcome = None
        if outcome is not None:
            return outcome
        return PSPResult(True, authorization_code=f"{self._rng.randrange(10**6):06d}")

    async def charge(
        self, key: str, *, amount: int, currency: str, payment_method: str
    ) -> PSPResult:
        s = self._settings
        await self._latency()
        roll = self._rng.random()
        if roll < s.psp_error_rate:
            raise PSPUnavailable("PSP answered 503")
        if roll < s.psp_error_rate + s.psp_timeout_rate:
            await asyncio.Event().wait()  # never answers; the caller's timeout fires
        request_hash = hashlib.sha256(f"{amount}:{currency}:{payment_method}".encode()).hexdigest()
        decided = self._decide(key, payment_method)
        row = await self._pool.fetchrow(
            INSERT_CHARGE, key, request_hash, amount, currency, payment_method,
            "captured" if decided.succeeded else "declined", decided.authorization_code,
            decided.failure_code, decided.decline_code, decided.failure_message)
        if row is None:  # the key was seen before: answer what was decided then
            row = await self._pool.fetchrow(FETCH_CHARGE, key)
            log.info("psp replayed a charge", extra={"ids": {"psp_key": key}})
        if row["request_hash"] != request_hash:
            raise PSPRejected("idempotency key reused with different parameters")
        if row["payment_method"] in CRYPTO_METHODS:
            await asyncio.sleep(self._until_confirmed(row))
        if roll < s.psp_error_rate + s.psp_timeout_rate + s.psp_lost_reply_rate:
            await asyncio.Event().wait()  # committed, but the reply is lost
        return _result(row)

    def _until_confirmed(self, row: Any) -> float:
        """Seconds until the payment's transaction has its confirmations (0 once it has)."""
        s = self._settings
        wait = timedelta(seconds=s.psp_crypto_confirmations * s.psp_crypto_block_time_s)
        left: timedelta = row["created_at"] + wait - datetime.now(UTC)
        return max(left.total_seconds(), 0.0)

    async def lookup(self, key: str) -> PSPResult | None:
        await self._latency()
        row = await self._pool.fetchrow(FETCH_CHARGE, key)
        if row is None:
            return None
        if row["payment_method"] in CRYPTO_METHODS and self._until_confirmed(row) > 0:
            raise PSPUnavailable("the payment's transaction is not confirmed yet")
        return _result(row)

    async def refund(self, key: str, *, charge_key: str, amount: int) -> PSPRefundResult:
        """Refund `amount` of the charge made with `charge_key`; asked again with the same key,
        the refund as it stands now. PSPRejected when the charge was not captured or has less
        left to refund."""
        s = self._settings
        await self._latency()
        roll = self._rng.random()
        if roll < s.psp_error_rate:
            raise PSPUnavailable("PSP answered 503")
        if roll < s.psp_error_rate + s.psp_timeout_rate:
            await asyncio.Event().wait()
        request_hash = hashlib.sha256(f"{charge_key}:{amount}".encode()).hexdigest()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(FAIL_DUE_REFUND, key, REFUND_FAILURE) \
                or await conn.fetchrow(FETCH_REFUND, key)
            if row is None:
                row = await self._new_refund(conn, key, charge_key, amount, request_hash)
        if row["request_hash"] != request_hash:
            raise PSPRejected("idempotency key reused with different parameters")
        if roll < s.psp_error_rate + s.psp_timeout_rate + s.psp_lost_reply_rate:
            await asyncio.Event().wait()
        return _refund_result(row)

    async def _new_refund(self, conn: Any, key: str, charge_key: str, amount: int,
                          request_hash: str) -> Any:
        charge = await conn.fetchrow(LOCK_CHARGE, charge_key)
        if charge is None or charge["outcome"] != "captured":
            raise PSPRejected("no captured charge to refund")
        # A concurrent call with the same key may have written it while this one waited.
        row = await conn.fetchrow(FETCH_REFUND, key)
        if row is not None:
            return row
        refunded = await conn.fetchval(REFUNDED, charge_key)
        if refunded + amount > charge["amount"]:
            raise PSPRejected(f"refund of {amount} exceeds what is left of the charge "
                              f"({charge['amount'] - refunded})")
        fails_at = None
        if charge["payment_method"] == REFUND_FAILS:
            fails_at = datetime.now(UTC) + timedelta(seconds=self._settings.psp_refund_fail_after_s)
        return await conn.fetchrow(INSERT_REFUND, key, charge_key, request_hash, amount,
                                   fails_at)
