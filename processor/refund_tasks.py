"""Refunds at the PSP, run off the intent's chain, as processor/attempts.py runs authorizations.

A new refund commits `pending` with its task (the refunds row, processor/refunds.py). The task
is run here under a lease in Postgres: the PSP is asked with the refund's own idempotency key
(retried with the same key on errors and timeouts, so money is returned at most once), the
answer is stored on the row and published as an ApplyRefundResult command on the intent's
partition, where it is applied in order with the intent's other commands. A processor that
dies mid-way leaves the lease to expire; the sweeper of any processor resumes the task.

The PSP may answer that a refund succeeded and is not final (it can still fail). Applying
such an answer makes the task due again `refund_recheck_s` later; asking again with the same
key tells how the refund stands, until the answer is final.

A refund cannot be given up on as an authorization is (nothing tells that the PSP did not
return the money): while the PSP fails, a claim makes up to `psp_max_tries` tries and the
task is due again after the longest pause. An answer reported and never applied is reported
again as attempts' are, MAX_REPORTS times.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any, Protocol

from contracts import refunds as states
from contracts.commands import ApplyRefundResult
from contracts.topology import CommandPublisher, PublishFailed
from ops.logs import bound
from ops.loops import Loop
from ops.postgres import Database, is_transient
from ops.settings import Settings
from processor import metrics
from processor.attempts import BACKOFF_START_S, MAX_REPORTS, SWEEP_BATCH
from processor.batches import Coalescer
from processor.psp import PSPRefundResult, PSPRejected, PSPUnavailable

log = logging.getLogger(__name__)

CLAIM = """
UPDATE refunds
SET locked_until = now() + make_interval(secs => $2), tries = tries + 1, updated_at = now()
WHERE id = ANY($1::text[]) AND task = 'pending' AND next_try_at <= now()
  AND (locked_until IS NULL OR locked_until < now())
RETURNING *
"""
RENEW = """
UPDATE refunds SET locked_until = now() + make_interval(secs => $2), updated_at = now()
WHERE id = $1
"""
# A concurrent runner may have stored an answer first: the stored one is kept and returned.
STORE_RESULT = """
UPDATE refunds r SET result = COALESCE(r.result, u.r), updated_at = now()
FROM unnest($1::text[], $2::jsonb[]) AS u(i, r)
WHERE r.id = u.i
RETURNING r.id, r.result
"""
# Only while the answer is still there: its command may have been applied already, and have
# settled the task or made it due again (result NULL) for the next question.
REPORTED = """
UPDATE refunds SET task = 'reported', locked_until = NULL, updated_at = now()
WHERE id = ANY($1::text[]) AND task = 'pending' AND result IS NOT NULL
"""
RETRY_LATER = """
UPDATE refunds
SET locked_until = NULL, next_try_at = now() + make_interval(secs => $2), updated_at = now()
WHERE id = $1
"""
RELEASE = "UPDATE refunds SET locked_until = NULL WHERE id = $1 AND task = 'pending'"
REREPORT = """
UPDATE refunds
SET task = 'pending', reports = reports + 1, locked_until = NULL, next_try_at = now(),
    updated_at = now()
WHERE id IN (
    SELECT id FROM refunds
    WHERE commands_exchange = $1 AND task = 'reported' AND reports < $2
      AND updated_at < now() - make_interval(secs => $3 * power(2, reports))
    LIMIT $4
    FOR UPDATE SKIP LOCKED)
RETURNING id
"""
DUE = """
SELECT id FROM refunds
WHERE commands_exchange = $2 AND task = 'pending' AND next_try_at <= now()
  AND (locked_until IS NULL OR locked_until < now())
ORDER BY next_try_at
LIMIT $1
"""

REFUND_PREFIX = "re_"


class RefundPSP(Protocol):
    async def refund(self, key: str, *, charge_key: str, amount: int) -> PSPRefundResult: ...


def split_tasks(task_ids: list[str]) -> tuple[list[str], list[str]]:
    """(payment attempts, refunds) among the PSP tasks a command started."""
    refunds = [t for t in task_ids if t.startswith(REFUND_PREFIX)]
    return [t for t in task_ids if not t.startswith(REFUND_PREFIX)], refunds


class RefundRunner:
    def __init__(self, pool: Database, psp: RefundPSP, publisher: CommandPublisher,
                 settings: Settings, commands_exchange: str) -> None:
        self._pool = pool
        self._psp = psp
        self._publisher = publisher
        self._settings = settings
        # Only refunds whose answers go to this exchange are resumed here.
        self._commands_exchange = commands_exchange
        self._running: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._claim: Coalescer[str, Any] = Coalescer(self._claim_many)
        self._store: Coalescer[str, Any] = Coalescer(self._store_many)
        self._reported: Coalescer[str, None] = Coalescer(self._report_many)

    async def _claim_many(self, rows: list[tuple[str, Any]]) -> dict[str, Any]:
        claimed = await self._pool.fetch(CLAIM, [i for i, _ in rows], self._settings.psp_lease_s)
        return {row["id"]: row for row in claimed}

    async def _store_many(self, rows: list[tuple[str, Any]]) -> dict[str, Any]:
        stored = await self._pool.fetch(STORE_RESULT, [i for i, _ in rows], [r for _, r in rows])
        return {row["id"]: row["result"] for row in stored}

    async def _report_many(self, rows: list[tuple[str, Any]]) -> dict[str, None]:
        await self._pool.execute(REPORTED, [i for i, _ in rows])
        return {}

    def kick(self, refund_ids: list[str]) -> None:
        # Refunds are few next to payments: they share the PSP's concurrency bound, and past it
        # are left to the sweeper.
        for refund_id in refund_ids:
            if (self._stopping or refund_id in self._running
                    or len(self._running) >= self._settings.psp_concurrency):
                continue
            task = asyncio.create_task(self._run(refund_id))
            self._running[refund_id] = task
            task.add_done_callback(functools.partial(self._done, refund_id))

    def _done(self, refund_id: str, _: asyncio.Task[None]) -> None:
        self._running.pop(refund_id, None)

    async def _run(self, refund_id: str) -> None:
        try:
            refund = await self._claim(refund_id)
            if refund is None:
                return
            with bound(request_id=refund["request_id"], account=refund["account_id"],
                       intent=refund["payment_intent_id"], refund=refund_id):
                await self._settle(refund)
        except Exception as exc:
            transient = is_transient(exc)
            metrics.TRANSIENT_FAILURES.labels(
                "refund" if transient else "refund_unexpected").inc()
            log.warning("refund interrupted; the sweeper resumes it",
                        extra={"ids": {"refund": refund_id, "error": repr(exc)}},
                        exc_info=not transient)
            with contextlib.suppress(Exception):
                await self._pool.execute(RELEASE, refund_id)

    async def _settle(self, refund: Any) -> None:
        refund_id = refund["id"]
        stored = refund["result"]
        result = PSPRefundResult.from_json(stored) if stored else await self._call_psp(refund)
        if result is None:
            return
        if stored is None:
            kept = await self._store(refund_id, result.to_json())
            assert kept is not None, refund_id  # the row exists: this runner claimed it
            result = PSPRefundResult.from_json(kept)
        command = ApplyRefundResult(
            account_id=refund["account_id"], intent_id=refund["payment_intent_id"],
            request_id=refund["request_id"] or "", accepted_at=int(time.time()),
            refund_id=refund_id, status=result.status, failure_reason=result.failure_reason,
            final=result.final,
            recheck_ms=0 if result.final else int(self._settings.refund_recheck_s * 1000))
        try:
            await self._publisher.publish(command)
        except PublishFailed as exc:
            log.warning("could not publish refund result; retrying",
                        extra={"ids": {"error": str(exc)}})
            await self._pool.execute(RETRY_LATER, refund_id, 1.0)
            return
        await self._reported(refund_id)
        log.info("refund result reported", extra={"ids": {"status": result.status,
                                                          "final": result.final}})

    async def _call_psp(self, refund: Any) -> PSPRefundResult | None:
        """The PSP's answer, or None to ask again later."""
        s = self._settings
        delay = BACKOFF_START_S
        for try_number in range(1, s.psp_max_tries + 1):
            metrics.PSP_IN_FLIGHT.inc()
            started = time.perf_counter()
            outcome = "error"
            try:
                async with asyncio.timeout(s.psp_timeout_s):
                    result = await self._psp.refund(refund["psp_key"],
                                                    charge_key=refund["charge_psp_key"],
                                                    amount=refund["amount"])
            except TimeoutError:
                outcome = "timeout"
                log.warning("psp timed out on a refund; retrying with the same key",
                            extra={"ids": {"try": try_number}})
            except PSPUnavailable as exc:
                outcome = "unavailable"
                log.warning("psp unavailable for a refund; retrying",
                            extra={"ids": {"error": str(exc)}})
            except PSPRejected as exc:
                outcome = "rejected"
                log.error("psp rejected the refund", extra={"ids": {"error": str(exc)}})
                return PSPRefundResult("failed", failure_reason=states.DECLINED)
            else:
                outcome = f"refund_{result.status}"
                return result
            finally:
                metrics.PSP_IN_FLIGHT.dec()
                metrics.PSP_CALLS.labels(outcome).inc()
                metrics.PSP_SECONDS.labels(outcome).observe(time.perf_counter() - started)
            if self._stopping:
                await self._pool.execute(RELEASE, refund["id"])
                return None
            await self._pool.execute(RENEW, refund["id"], s.psp_lease_s)
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.psp_max_pause_s)
        log.warning("psp did not answer a refund in this claim's tries; asked again later")
        await self._pool.execute(RETRY_LATER, refund["id"], s.psp_max_pause_s)
        return None

    async def sweep(self, loop: Loop) -> None:
        """The sweeper's body (ops.loops.Loop): resume refunds whose processor died, that are
        due again, or whose answer was never applied."""
        s = self._settings
        while True:
            again = await self._pool.fetch(REREPORT, self._commands_exchange, MAX_REPORTS,
                                           s.psp_report_timeout_s, SWEEP_BATCH)
            if again:
                metrics.RESULTS_REREPORTED.inc(len(again))
                log.warning("refund results reported again: not applied in time",
                            extra={"ids": {"refunds": len(again)}})
            rows = await self._pool.fetch(DUE, SWEEP_BATCH, self._commands_exchange)
            self.kick([r["id"] for r in rows])
            loop.beat()
            await asyncio.sleep(s.sweep_interval_s)

    async def stop(self, grace_s: float) -> None:
        """Let PSP calls under way finish; refunds not finished in time keep their lease until
        it runs out."""
        self._stopping = True
        running = list(self._running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
