"""Refunds at the PSP, run off the intent's chain, with the lease protocol of payment attempts
(processor/attempts.py).

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
import logging
import time
from typing import Any

from contracts import refunds as states
from contracts.commands import ApplyRefundResult, Command
from ops.loops import Loop
from processor.attempts import AttemptRunner, LeaseSQL
from processor.psp import PSPRefundResult

log = logging.getLogger(__name__)

REFUNDS_SQL = LeaseSQL.for_table("refunds", "task", renew_counts_a_try=False)


class RefundRunner(AttemptRunner):
    """Runs the refunds' PSP tasks (this module's docstring)."""

    sql = REFUNDS_SQL
    name = "refund"
    result_type = PSPRefundResult

    def _first_try(self, refund: Any) -> int:
        # Every claim makes up to psp_max_tries tries: a refund is never given up on.
        return 1

    def _outcome(self, result: Any) -> str:
        return f"refund_{result.status}"

    async def _psp_call(self, refund: Any) -> PSPRefundResult:
        return await self._psp.refund(refund["psp_key"], charge_key=refund["charge_psp_key"],
                                      amount=refund["amount"])

    def _rejected(self, reason: str) -> PSPRefundResult:
        return PSPRefundResult("failed", failure_reason=states.DECLINED)

    def _result_command(self, refund: Any, result: PSPRefundResult) -> Command:
        return ApplyRefundResult(
            account_id=refund["account_id"], intent_id=refund["payment_intent_id"],
            request_id=refund["request_id"] or "", accepted_at=int(time.time()),
            refund_id=refund["id"], status=result.status, failure_reason=result.failure_reason,
            final=result.final,
            recheck_ms=0 if result.final else int(self._settings.refund_recheck_s * 1000))

    async def _give_up(self, refund: Any) -> None:
        log.warning("psp did not answer a refund in this claim's tries; asked again later")
        await self._pool.execute(self.sql.retry_later, refund["id"],
                                 self._settings.psp_max_pause_s)

    async def sweep(self, loop: Loop) -> None:
        """The sweeper's body (ops.loops.Loop): resume refunds whose processor died, that are
        due again, or whose answer was never applied."""
        while True:
            await self.sweep_once()
            loop.beat()
            await asyncio.sleep(self._settings.sweep_interval_s)
