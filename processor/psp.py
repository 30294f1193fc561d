"""The PSP adapter, and the simulator behind it.

The simulator behaves as a real PSP does for what payonce relies on: it keeps its own books
(schema `psp`), dedupes on the idempotency key (a retry with the same key gets the first
answer, never a second charge), answers after a network-like latency, and fails at
configurable rates: declines, 5xx errors, and timeouts before or after it committed the charge.
Stripe's test payment methods decide the outcome deterministically.

A charge is captured at once, or only authorized (`capture=False`). An authorization is then
settled once, by a capture of at most what it holds (the rest is released) or by a void; a
captured charge can be reversed once. Each of these operations has its own idempotency key
(`psp.operations`), and the books refuse a second settlement of an authorization whatever
its key: captured - released - reversed is what moved, never two captures.

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
    # An authorization only, when the charge asked not to capture. Results stored before
    # authorizations existed lack it: they were all captured.
    captured: bool = True

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
        self, key: str, *, amount: int, currency: str, payment_method: str,
        capture: bool = True,
    ) -> PSPResult: ...

    async def lookup(self, key: str) -> PSPResult | None: ...

    async def operate(
        self, key: str, *, kind: str, authorization_key: str, amount: int
    ) -> PSPResult: ...

    async def refund(self, key: str, *, charge_key: str, amount: int) -> PSPRefundResult: ...


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
FETCH_OPERATION = "SELECT * FROM psp.operations WHERE idempotency_key = $1"
LOCK_AUTHORIZATION = "SELECT * FROM psp.charges WHERE idempotency_key = $1 FOR UPDATE"
OPERATIONS_OF = "SELECT * FROM psp.operations WHERE charge_key = $1"
INSERT_OPERATION = """
INSERT INTO psp.operations (idempotency_key, charge_key, kind, amount) VALUES ($1, $2, $3, $4)
"""
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
        succeeded=row["outcome"] != "declined",
        authorization_code=row["authorization_code"],
        failure_code=row["failure_code"],
        decline_code=row["decline_code"],
        failure_message=row["failure_message"],
        captured=row["outcome"] == "captured",
    )


def _captured(charge: Any, done: list[Any]) -> int:
    """What moved on the charge and stays moved: captured at once or later, less a reversal."""
    if any(op["kind"] == "reverse" for op in done):
        return 0
    if charge["outcome"] == "captured":
        return int(charge["amount"])
    return sum(int(op["amount"]) for op in done if op["kind"] == "capture")


def _operation_refusal(kind: str, amount: int, charge: Any, done: list[Any]) -> str | None:
    """Why the books refuse the operation on this charge, or None."""
    settled = [op for op in done if op["kind"] in ("capture", "void")]
    captured = charge["amount"] if charge["outcome"] == "captured" else sum(
        op["amount"] for op in done if op["kind"] == "capture")
    if kind in ("capture", "void"):
        if charge["outcome"] != "authorized":
            return f"the charge is {charge['outcome']}, not an authorization"
        if settled:
            return f"the authorization was already settled by a {settled[0]['kind']}"
        if amount > charge["amount"]:
            return f"cannot {kind} {amount}: the authorization holds {charge['amount']}"
        return None
    if not captured:
        return "nothing of the charge was captured"
    if any(op["kind"] == "reverse" for op in done):
        return "the charge was already reversed"
    if amount != captured:
        return f"a reversal gives back what was captured ({captured}), not {amount}"
    return None


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

    async def _faults(self) -> float:
        """Latency, then a 5xx or no answer at the configured rates; the roll, for a reply
        lost after the commit."""
        s = self._settings
        await self._latency()
        roll = self._rng.random()
        if roll < s.psp_error_rate:
            raise PSPUnavailable("PSP answered 503")
        if roll < s.psp_error_rate + s.psp_timeout_rate:
            await asyncio.Event().wait()  # never answers; the caller's timeout fires
        return roll

    async def _lose_reply(self, roll: float) -> None:
        s = self._settings
        if roll < s.psp_error_rate + s.psp_timeout_rate + s.psp_lost_reply_rate:
            await asyncio.Event().wait()  # committed, but the reply is lost

    async def charge(
        self, key: str, *, amount: int, currency: str, payment_method: str,
        capture: bool = True,
    ) -> PSPResult:
        roll = await self._faults()
        # An authorization-only request is another request than a charge: a key reused
        # across the two is refused.
        what = f"{amount}:{currency}:{payment_method}" + ("" if capture else ":authorize")
        request_hash = hashlib.sha256(what.encode()).hexdigest()
        decided = self._decide(key, payment_method)
        outcome = "declined" if not decided.succeeded else "captured" if capture else "authorized"
        row = await self._pool.fetchrow(
            INSERT_CHARGE, key, request_hash, amount, currency, payment_method,
            outcome, decided.authorization_code,
            decided.failure_code, decided.decline_code, decided.failure_message)
        if row is None:  # the key was seen before: answer what was decided then
            row = await self._pool.fetchrow(FETCH_CHARGE, key)
            log.info("psp replayed a charge", extra={"ids": {"psp_key": key}})
        if row["request_hash"] != request_hash:
            raise PSPRejected("idempotency key reused with different parameters")
        if row["payment_method"] in CRYPTO_METHODS:
            await asyncio.sleep(self._until_confirmed(row))
        await self._lose_reply(roll)
        return _result(row)

    async def operate(
        self, key: str, *, kind: str, authorization_key: str, amount: int
    ) -> PSPResult:
        """Capture `amount` of an authorization, void it, or reverse a captured charge; the
        first answer for `key` is the answer to every retry with it. A refusal (PSPRejected)
        records nothing."""
        roll = await self._faults()
        async with self._pool.acquire() as conn, conn.transaction():
            # The charge's row lock orders concurrent operations on one authorization.
            charge = await conn.fetchrow(LOCK_AUTHORIZATION, authorization_key)
            if charge is None:
                raise PSPRejected(f"no charge {authorization_key}")
            done = await conn.fetch(OPERATIONS_OF, authorization_key)
            replay = next((op for op in done if op["idempotency_key"] == key), None)
            if replay is None:
                if await conn.fetchrow(FETCH_OPERATION, key) is not None:
                    raise PSPRejected("idempotency key reused for another charge")
                refusal = _operation_refusal(kind, amount, charge, done)
                if refusal is not None:
                    raise PSPRejected(refusal)
                await conn.execute(INSERT_OPERATION, key, authorization_key, kind, amount)
            elif (replay["kind"], replay["amount"]) != (kind, amount):
                raise PSPRejected("idempotency key reused with different parameters")
            else:
                log.info("psp replayed an operation", extra={"ids": {"psp_key": key}})
        await self._lose_reply(roll)
        return PSPResult(True)

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
        roll = await self._faults()
        request_hash = hashlib.sha256(f"{charge_key}:{amount}".encode()).hexdigest()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(FAIL_DUE_REFUND, key, REFUND_FAILURE) \
                or await conn.fetchrow(FETCH_REFUND, key)
            if row is None:
                row = await self._new_refund(conn, key, charge_key, amount, request_hash)
        if row["request_hash"] != request_hash:
            raise PSPRejected("idempotency key reused with different parameters")
        await self._lose_reply(roll)
        return _refund_result(row)

    async def _new_refund(self, conn: Any, key: str, charge_key: str, amount: int,
                          request_hash: str) -> Any:
        # The charge's row lock orders refunds and operations on one charge.
        charge = await conn.fetchrow(LOCK_AUTHORIZATION, charge_key)
        captured = 0 if charge is None else _captured(charge, await conn.fetch(OPERATIONS_OF,
                                                                                charge_key))
        if not captured:
            raise PSPRejected("no captured charge to refund")
        # A concurrent call with the same key may have written it while this one waited.
        row = await conn.fetchrow(FETCH_REFUND, key)
        if row is not None:
            return row
        refunded = await conn.fetchval(REFUNDED, charge_key)
        if refunded + amount > captured:
            raise PSPRejected(f"refund of {amount} exceeds what is left of the charge "
                              f"({captured - refunded})")
        fails_at = None
        if charge["payment_method"] == REFUND_FAILS:
            fails_at = datetime.now(UTC) + timedelta(seconds=self._settings.psp_refund_fail_after_s)
        return await conn.fetchrow(INSERT_REFUND, key, charge_key, request_hash, amount,
                                   fails_at)
