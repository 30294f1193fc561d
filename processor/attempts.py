"""PSP attempts, run off the intent's chain.

A confirm commits `processing` and a pending attempt. The attempt is then run here, under a
lease in Postgres: the PSP is called with the attempt's own idempotency key (retried with the
same key on errors and timeouts, so the PSP charges at most once), the answer is stored on the
attempt as it is marked reported (one statement), then published as an ApplyPSPResult command
on the intent's partition, where it is applied in order with anything else the client sent
meanwhile. A processor that dies before the answer is stored leaves the lease to expire; the
sweeper of any processor then resumes the attempt.

A result reported but never applied (its command dead-lettered, lost with a broker's data, or
never published because its runner died after storing it) would leave its intent
`processing` forever: the sweeper reports it again after
`psp_report_timeout_s`, then after twice that, and so on, MAX_REPORTS times (applying a result
is idempotent). Past that, the intent waits for an operator, and the stuck-intents gauge says so.

The transaction that makes an attempt claims it for this processor (processor/batches.py,
INSERT_ATTEMPTS), so its runner starts it from the row it is handed, without a claim of its
own; one that waited long for a free slot has its lease renewed first, unless another runner
took it meanwhile. A processor that dies before
it starts them leaves their leases to expire, as it leaves those of attempts under way.

At most `psp_concurrency` attempts run at once per processor; attempts kicked beyond that wait
in memory up to a bound, and past it are left to the sweeper, which finds them in Postgres
(their leases given back, if they were handed claimed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from contracts.commands import ApplyPSPResult, Command
from contracts.topology import CommandPublisher, PublishFailed
from ops import failpoints
from ops.logs import bound
from ops.loops import Loop
from ops.postgres import Database, is_transient
from ops.settings import Settings
from processor import metrics
from processor.batches import Coalescer
from processor.psp import PSP, PSPRejected, PSPResult, PSPUnavailable

log = logging.getLogger(__name__)

# Starts of commands that were dead-lettered by the broker, or never came back.
FORGET_OLD_STARTS = "DELETE FROM command_starts WHERE last_at < now() - interval '1 day'"


@dataclass(frozen=True, slots=True)
class LeaseSQL:
    """The statements of the lease protocol for one table of PSP work (this module's
    docstring): payment_attempts here, psp_tasks and refunds in their own modules."""

    claim: str
    reclaim: str
    renew: str
    report: str
    unreport: str
    retry_later: str
    release: str
    rereport: str
    due: str

    @classmethod
    def for_table(cls, table: str, state: str = "state", *,
                  renew_counts_a_try: bool = True) -> LeaseSQL:
        """The statements for `table`, whose `state` column reads pending, reported or
        settled. `renew_counts_a_try`: a renewed lease counts as one more try.

        Claims and reports of rows running at the same time go to Postgres together, one
        statement each (processor/batches.py, Coalescer), and a batch of commands settles
        many rows in one statement (processor/batches.py, processor/lifecycle.py). Every
        statement that may wait on several rows locks them in id order (`ordered`): in any
        other order two of them can each hold a row the other waits for, a deadlock that
        PostgreSQL breaks by failing one after a second."""
        tries = ", tries = tries + 1" if renew_counts_a_try else ""
        pending = f"{state} = 'pending'"
        return cls(
            claim=f"""
UPDATE {table}
SET locked_until = now() + make_interval(secs => $2), tries = tries + 1, updated_at = now()
WHERE id IN ({ordered(table, f"{pending} AND next_try_at <= now() "
                            "AND (locked_until IS NULL OR locked_until < now())")})
RETURNING *
""",
            # A row handed claimed (processor/batches.py, INSERT_ATTEMPTS) whose lease may be
            # short of a PSP call now: its lease renewed, if it is still the one handed over
            # ($3) or has run out; not if another runner took the row meanwhile.
            reclaim=f"""
UPDATE {table}
SET locked_until = now() + make_interval(secs => $2), tries = tries + 1, updated_at = now()
WHERE id = $1 AND {pending} AND next_try_at <= now()
  AND (locked_until IS NULL OR locked_until < now() OR locked_until = $3)
RETURNING *
""",
            renew=f"""
UPDATE {table} SET locked_until = now() + make_interval(secs => $2){tries}, updated_at = now()
WHERE id = $1
""",
            # Stores the answer and marks the row reported before its command is published:
            # from then on the sweep's report timeout covers it, whether the publish goes
            # through or the runner dies first. A result stored earlier (by a runner that died
            # before it could report it) is kept and returned. A row that is not pending any
            # more was reported by another runner and is left out of the answer.
            report=f"""
UPDATE {table} t
SET result = COALESCE(t.result, u.r), {state} = 'reported', locked_until = NULL,
    reported_at = now(), updated_at = now()
FROM unnest($1::text[], $2::jsonb[]) AS u(i, r)
WHERE t.id = u.i AND t.id IN ({ordered(table, pending)})
RETURNING t.id, t.result
""",
            # A publish that failed: due again after $2 s, unless its command was applied
            # meanwhile (a confirm lost after the broker took the message).
            unreport=f"""
UPDATE {table}
SET {state} = 'pending', next_try_at = now() + make_interval(secs => $2), updated_at = now()
WHERE id = $1 AND {state} = 'reported'
""",
            retry_later=f"""
UPDATE {table}
SET locked_until = NULL, next_try_at = now() + make_interval(secs => $2), updated_at = now()
WHERE id = $1
""",
            release=f"""
UPDATE {table} SET locked_until = NULL WHERE id IN ({ordered(table, pending)})
""",
            # SKIP LOCKED: a sweep never waits, so it needs no order.
            rereport=f"""
UPDATE {table}
SET {state} = 'pending', reports = reports + 1, locked_until = NULL, next_try_at = now(),
    updated_at = now()
WHERE id IN (
    SELECT id FROM {table}
    WHERE commands_exchange = $1 AND {state} = 'reported' AND reports < $2
      AND coalesce(reported_at, updated_at)
          < now() - make_interval(secs => $3 * power(2, reports))
    LIMIT $4
    FOR UPDATE SKIP LOCKED)
RETURNING id
""",
            due=f"""
SELECT id FROM {table}
WHERE commands_exchange = $2 AND {pending} AND next_try_at <= now()
  AND (locked_until IS NULL OR locked_until < now())
ORDER BY next_try_at
LIMIT $1
""")


def ordered(table: str, condition: str = "") -> str:
    """The rows of `table` whose ids are in $1 (and that meet `condition`), locked in id
    order: for `WHERE id IN (...)` of a statement that changes several rows."""
    where = f" AND {condition}" if condition else ""
    return (f"SELECT id FROM {table} WHERE id = ANY($1::text[]){where} "
            "ORDER BY id FOR UPDATE")


ATTEMPTS_SQL = LeaseSQL.for_table("payment_attempts")

# Retries with the same key inside one claim, spaced by 0.2 s doubling to what the lease
# leaves after a call (Settings.psp_max_pause_s).
BACKOFF_START_S = 0.2
SWEEP_BATCH = 500
MAX_REPORTS = 5


class AttemptRunner:
    """Runs payment_attempts: the PSP authorization of each, then its result reported.
    Subclasses run other PSP work with the same protocol by giving their own `sql` and `name`
    and their own `_psp_call`, `_rejected`, `_give_up` and `_result_command`."""

    sql: LeaseSQL = ATTEMPTS_SQL
    name = "attempt"
    # What the PSP answers, as stored on the row (to_json) and read back (from_json).
    result_type: Any = PSPResult

    def __init__(
        self, pool: Database, psp: PSP, publisher: CommandPublisher, settings: Settings,
        commands_exchange: str,
    ) -> None:
        self._pool = pool
        # Only attempts whose results go to this exchange are resumed here.
        self._commands_exchange = commands_exchange
        self._psp = psp
        self._publisher = publisher
        self._settings = settings
        self._running: dict[str, asyncio.Task[None]] = {}
        # Insertion-ordered: first kicked, first run. A claimed row comes with when it was
        # handed over.
        self._waiting: dict[str, tuple[Any, float] | None] = {}
        self._waiting_max = 4 * settings.psp_concurrency
        # A claimed row is started as it is while its lease still covers a PSP call with room
        # to spare; past that its lease is renewed first (LeaseSQL.reclaim).
        self._claimed_fresh_s = (settings.psp_lease_s - settings.psp_timeout_s) / 2
        self._releasing: set[asyncio.Task[None]] = set()
        self._stopping = False
        # A result is stored before it is published: waiting longer for the broker's confirm
        # costs only this runner's slot, where giving up publishes it once more to a broker
        # already slow. So it waits as long as the lease has left after a PSP call, and never
        # less than any publish.
        self._confirm_s = max(settings.publish_timeout_s,
                              settings.psp_lease_s - settings.psp_timeout_s)
        self._claim: Coalescer[str, Any] = Coalescer(self._claim_many)
        self._report: Coalescer[str, Any] = Coalescer(self._report_many)

    async def _claim_many(self, rows: list[tuple[str, Any]]) -> dict[str, Any]:
        claimed = await self._pool.fetch(self.sql.claim, [i for i, _ in rows],
                                         self._settings.psp_lease_s)
        return {row["id"]: row for row in claimed}

    async def _report_many(self, rows: list[tuple[str, Any]]) -> dict[str, Any]:
        stored = await self._pool.fetch(self.sql.report, [i for i, _ in rows],
                                        [r for _, r in rows])
        return {row["id"]: row["result"] for row in stored}

    def kick(self, attempt_ids: Iterable[str], claimed: Sequence[Any] = ()) -> None:
        """Run these rows: by id, or as rows claimed for this runner (this module's
        docstring)."""
        for attempt_id in attempt_ids:
            self._queue(attempt_id, None)
        now = time.monotonic()
        given_back = [row["id"] for row in claimed if not self._queue(row["id"], (row, now))]
        if given_back:
            self._release_soon(given_back)
        self._fill()

    def _queue(self, attempt_id: str, claimed: tuple[Any, float] | None) -> bool:
        """Whether the row waits its turn here now."""
        if self._stopping or attempt_id in self._running or attempt_id in self._waiting:
            return False
        if len(self._waiting) >= self._waiting_max:
            metrics.ATTEMPTS_DEFERRED.inc()
            return False
        self._waiting[attempt_id] = claimed
        return True

    def _release_soon(self, attempt_ids: list[str]) -> None:
        """Give back the leases of claimed rows this runner will not start, so that the sweeper
        finds them at once instead of when the leases run out."""
        async def release() -> None:
            try:
                await self._pool.execute(self.sql.release, attempt_ids)
            except Exception as exc:
                log.warning("could not give back leases; they run out",
                            extra={"ids": {f"{self.name}s": len(attempt_ids),
                                           "error": repr(exc)}})

        task = asyncio.create_task(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def _fill(self) -> None:
        while self._waiting and len(self._running) < self._settings.psp_concurrency:
            if self._stopping:
                self._waiting.clear()
                return
            attempt_id = next(iter(self._waiting))
            claimed = self._waiting.pop(attempt_id)
            task = asyncio.create_task(self._run(attempt_id, claimed))
            self._running[attempt_id] = task
            task.add_done_callback(functools.partial(self._done, attempt_id))
        metrics.ATTEMPTS_WAITING.set(len(self._waiting))

    def _done(self, attempt_id: str, _: asyncio.Task[None]) -> None:
        self._running.pop(attempt_id, None)
        self._fill()

    async def _run(self, attempt_id: str, claimed: tuple[Any, float] | None = None) -> None:
        try:
            if claimed is None:
                attempt = await self._claim(attempt_id)
            elif time.monotonic() - claimed[1] < self._claimed_fresh_s:
                attempt = claimed[0]
            else:
                attempt = await self._pool.fetchrow(
                    self.sql.reclaim, attempt_id, self._settings.psp_lease_s,
                    claimed[0]["locked_until"])
            if attempt is None:
                return
            with bound(request_id=attempt["request_id"], account=attempt["account_id"],
                       intent=attempt["payment_intent_id"], **{self.name: attempt_id}):
                await self._settle(attempt)
        except Exception as exc:
            transient = is_transient(exc)
            metrics.TRANSIENT_FAILURES.labels(
                self.name if transient else f"{self.name}_unexpected").inc()
            log.warning("attempt interrupted; the sweeper resumes it",
                        extra={"ids": {"attempt": attempt_id, "error": repr(exc)}},
                        exc_info=not transient)
            # No PSP call of ours is under way any more: give the lease back, so the next
            # sweep resumes the attempt instead of waiting for the lease to run out.
            with contextlib.suppress(Exception):
                await self._pool.execute(self.sql.release, [attempt_id])

    async def _settle(self, attempt: Any) -> None:
        attempt_id = attempt["id"]
        stored = attempt["result"]
        result = self.result_type.from_json(stored) if stored else await self._call_psp(attempt)
        if result is None:
            return
        failpoints.hit("processor.after_psp_call", self.name)
        kept = await self._report(attempt_id, result.to_json())
        if kept is None:
            log.info("psp result already reported by another runner")
            return
        result = self.result_type.from_json(kept)
        failpoints.hit("processor.after_result_stored", self.name)
        command = self._result_command(attempt, result)
        try:
            await self._publisher.publish(command, timeout_s=self._confirm_s)
        except PublishFailed as exc:
            log.warning("could not publish psp result; retrying",
                        extra={"ids": {"error": str(exc)}})
            await self._pool.execute(self.sql.unreport, attempt_id, 1.0)
            return
        failpoints.hit("processor.after_result_published", self.name)
        log.info("psp result reported", extra={"ids": {"outcome": self._outcome(result)}})

    def _first_try(self, attempt: Any) -> int:
        """The number of this claim's first try: the tries of every claim count."""
        return int(attempt["tries"])

    def _outcome(self, result: Any) -> str:
        """The PSP_CALLS label of an answer."""
        return "succeeded" if result.succeeded else "declined"

    async def _call_psp(self, attempt: Any) -> Any:
        """The PSP's answer, or None to try again later."""
        s = self._settings
        delay = BACKOFF_START_S
        for try_number in range(self._first_try(attempt), s.psp_max_tries + 1):
            metrics.PSP_IN_FLIGHT.inc()
            started = time.perf_counter()
            outcome = "error"
            try:
                async with asyncio.timeout(s.psp_timeout_s):
                    result = await self._psp_call(attempt)
            except TimeoutError:
                outcome = "timeout"
                log.warning("psp timed out; retrying with the same key",
                            extra={"ids": {"try": try_number}})
            except PSPUnavailable as exc:
                outcome = "unavailable"
                log.warning("psp unavailable; retrying", extra={"ids": {"error": str(exc)}})
            except PSPRejected as exc:
                outcome = "rejected"
                log.error("psp rejected the request", extra={"ids": {"error": str(exc)}})
                return self._rejected(str(exc))
            else:
                outcome = self._outcome(result)
                return result
            finally:
                metrics.PSP_IN_FLIGHT.dec()
                metrics.PSP_CALLS.labels(outcome).inc()
                metrics.PSP_SECONDS.labels(outcome).observe(time.perf_counter() - started)
            if self._stopping:
                await self._pool.execute(self.sql.release, [attempt["id"]])
                return None
            # Renewed before the pause, so the lease covers the pause and the next call.
            await self._pool.execute(self.sql.renew, attempt["id"], s.psp_lease_s)
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.psp_max_pause_s)
        return await self._give_up(attempt)

    async def _psp_call(self, attempt: Any) -> Any:
        return await self._psp.charge(
            attempt["psp_key"], amount=attempt["amount"], currency=attempt["currency"],
            payment_method=attempt["payment_method"], capture=attempt["capture"])

    def _rejected(self, reason: str) -> Any:
        """The result of a request the PSP refused outright."""
        return _processing_error()

    def _result_command(self, attempt: Any, result: Any) -> Command:
        return ApplyPSPResult(
            account_id=attempt["account_id"], intent_id=attempt["payment_intent_id"],
            request_id=attempt["request_id"] or "", accepted_at=int(time.time()),
            attempt_id=attempt["id"], **result.to_json())

    async def _give_up(self, attempt: Any) -> Any:
        """Out of tries: ask the PSP whether the charge exists. If it does, that is the answer;
        if the PSP says it does not, no retry with this key is outstanding any more, so the
        attempt fails cleanly and the intent goes back to requires_payment_method."""
        try:
            async with asyncio.timeout(self._settings.psp_timeout_s):
                found = await self._psp.lookup(attempt["psp_key"])
        except (TimeoutError, PSPUnavailable):
            log.warning("psp lookup failed; the attempt is retried later")
            await self._pool.execute(self.sql.retry_later, attempt["id"],
                                    self._settings.psp_max_pause_s)
            return None
        if found is not None:
            return found
        log.warning("psp has no charge for the attempt after every try; failing it")
        return _processing_error()

    async def sweep(self, loop: Loop) -> None:
        """The sweeper's body (ops.loops.Loop): resume attempts whose processor died or that
        are due for another try, and report again results that were never applied."""
        while True:
            await self.sweep_once()
            await self._pool.execute(FORGET_OLD_STARTS)
            loop.beat()
            await asyncio.sleep(self._settings.sweep_interval_s)

    async def sweep_once(self) -> None:
        again = await self._pool.fetch(self.sql.rereport, self._commands_exchange, MAX_REPORTS,
                                       self._settings.psp_report_timeout_s, SWEEP_BATCH)
        if again:
            metrics.RESULTS_REREPORTED.inc(len(again))
            log.warning("psp results reported again: not applied in time",
                        extra={"ids": {f"{self.name}s": len(again)}})
        rows = await self._pool.fetch(self.sql.due, SWEEP_BATCH, self._commands_exchange)
        self.kick([r["id"] for r in rows])

    async def stop(self, grace_s: float) -> None:
        """Let PSP calls under way finish (a call cut off is only retried later, with the same
        key); attempts not finished in time keep their lease until it runs out."""
        self._stopping = True
        claimed = [i for i, row in self._waiting.items() if row is not None]
        self._waiting.clear()
        if claimed:
            self._release_soon(claimed)
        running = [*self._running.values(), *self._releasing]
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)


def _processing_error() -> PSPResult:
    return PSPResult(False, failure_code="processing_error", decline_code="processing_error",
                     failure_message="An error occurred while processing your card. Try again "
                                     "in a little bit.")
