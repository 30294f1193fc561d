"""PSP tasks: work on an authorization that exists, run off the intent's chain.

A task is one PSP operation on one charge: `capture` (part or all of a manual intent's
authorization; the rest is released), `void` (release an authorization: a canceled manual
intent's, or one that came back after its intent was canceled) or `reverse` (give back an
automatic capture that came back after its intent was canceled). The transaction that applies
the command asking for it (a capture, a cancel, a late PSP result) commits the task with it;
the task is then run with the lease protocol of payment attempts (processor/attempts.py: a
lease in Postgres, the PSP called with the task's own idempotency key and retried with it, the
answer stored on the task, then published as an ApplyTaskResult command on the intent's
partition and applied in order with whatever the client sent meanwhile). A processor that dies
mid-way leaves the lease to expire and any sweeper resumes the task; a result reported but not
applied is reported again, as for attempts.

Every operation is safe to repeat with its key (the PSP dedupes it), so a task is never given
up: past its tries it is retried later, until the PSP answers. A refusal by the PSP (a capture
of more than is authorized, a second settlement of an authorization) is the task's result:
a failed task moves no money, and applying it says so on the intent.

The sweeper also expires authorizations: an intent left `requires_capture` longer than
`capture_window_s` is canceled by the system with an ExpireAuthorization command, whose
message id names the charge, so copies sent again are applied once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from contracts.commands import ApplyTaskResult, Command, ExpireAuthorization
from contracts.topology import PublishFailed
from ops.loops import Loop
from processor import metrics
from processor.attempts import SWEEP_BATCH, AttemptRunner, LeaseSQL
from processor.psp import PSPResult, PSPUnavailable

log = logging.getLogger(__name__)

TASKS_SQL = LeaseSQL.for_table("psp_tasks")
# Held authorizations are checked for expiry at least this often (see TaskRunner.sweep).
EXPIRY_CHECK_MAX_S = 60.0
# Authorizations held longer than the capture window, of this deployment's intents.
EXPIRED = """
SELECT p.id, p.account_id, c.id AS charge_id, a.request_id
FROM payment_intents p
JOIN charges c ON c.id = p.latest_charge
JOIN payment_attempts a ON a.id = c.attempt_id
WHERE p.status = 'requires_capture' AND a.commands_exchange = $1
  AND c.created < now() - make_interval(secs => $2)
LIMIT $3
"""


class TaskRunner(AttemptRunner):
    """Runs psp_tasks (this module's docstring) and expires uncaptured authorizations."""

    sql = TASKS_SQL
    name = "psp_task"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Expiries published and when: sent again only if still not applied after the report
        # timeout, not at every sweep while the first copy waits in its queue.
        self._expiring: dict[str, float] = {}

    async def _psp_call(self, task: Any) -> PSPResult:
        return await self._psp.operate(
            task["psp_key"], kind=task["kind"], authorization_key=task["authorization_key"],
            amount=task["amount"])

    def _rejected(self, reason: str) -> PSPResult:
        return PSPResult(False, failure_message=f"The PSP refused the {self.name}: {reason}.")

    def _result_command(self, task: Any, result: PSPResult) -> Command:
        return ApplyTaskResult(
            account_id=task["account_id"], intent_id=task["payment_intent_id"],
            request_id=task["request_id"] or "", accepted_at=int(time.time()),
            task_id=task["id"], succeeded=result.succeeded,
            failure_message=result.failure_message)

    async def _give_up(self, task: Any) -> PSPResult | None:
        """Out of tries in this claim: the operation is safe to repeat with its key, so it is
        tried once more and, failing that, later."""
        try:
            async with asyncio.timeout(self._settings.psp_timeout_s):
                return await self._psp_call(task)
        except (TimeoutError, PSPUnavailable):
            log.warning("psp task failed every try; it is retried later")
            await self._pool.execute(self.sql.retry_later, task["id"],
                                     self._settings.psp_max_pause_s)
            return None

    async def sweep(self, loop: Loop) -> None:
        """The sweeper's body: resume tasks, report again results never applied, and expire
        authorizations held past the capture window. Held authorizations are looked for a
        few times per window, at most every EXPIRY_CHECK_MAX_S: the query reads every one
        held, and with a window of days a check every sweep would read them all each second
        for nothing."""
        s = self._settings
        every_s = max(s.sweep_interval_s, min(s.capture_window_s / 4, EXPIRY_CHECK_MAX_S))
        next_check = 0.0
        while True:
            await self.sweep_once()
            if time.monotonic() >= next_check:
                await self._expire()
                next_check = time.monotonic() + every_s
            loop.beat()
            await asyncio.sleep(s.sweep_interval_s)

    async def _expire(self) -> None:
        s = self._settings
        now = time.monotonic()
        self._expiring = {k: at for k, at in self._expiring.items()
                          if now - at < s.psp_report_timeout_s}
        for row in await self._pool.fetch(EXPIRED, self._commands_exchange, s.capture_window_s,
                                          SWEEP_BATCH):
            if row["charge_id"] in self._expiring:
                continue
            command = ExpireAuthorization(
                account_id=row["account_id"], intent_id=row["id"],
                request_id=row["request_id"] or "", accepted_at=int(time.time()),
                charge_id=row["charge_id"])
            try:
                await self._publisher.publish(command)
            except PublishFailed as exc:
                metrics.TRANSIENT_FAILURES.labels("expiry").inc()
                log.warning("could not publish an expiry; retrying at the next sweep",
                            extra={"ids": {"intent": row["id"], "error": str(exc)}})
                return
            self._expiring[row["charge_id"]] = now
            metrics.AUTHORIZATIONS_EXPIRED.inc()
            log.info("uncaptured authorization expired", extra={"ids": {
                "intent": row["id"], "charge": row["charge_id"]}})
