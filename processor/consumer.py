"""Partition consumers: commands of one intent are applied one after another, in the order
the queue delivers them; commands of different intents run concurrently.

A message is acked only after its transaction committed. A message that is not a command, or
whose command keeps failing for a reason of its own, is rejected without requeue and so
dead-lettered. An unavailable dependency (ops.postgres.is_transient) is retried in place,
never by requeueing: a requeued message would be overtaken by the next command of its intent,
and would count towards the broker's delivery limit.

Crash isolation. The broker redelivers every message a consumer held when its channel closed
or its process died: one of them may be what killed the process. So a redelivered message is
applied alone in the process (an exclusive turn of the process's `Gate`; fresh messages share
it), after its start was recorded in Postgres (`command_starts`, deleted in the transaction
that applies it). A message found with POISON_STARTS unfinished starts killed a processor that
often while it ran alone: it is dead-lettered without running again. Its neighbours are applied
as usual, so a healthy command is never dead-lettered for another's fault, whatever the
broker's delivery count says.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aio_pika

from contracts.commands import ClientCommand, Command, CommandDecodeError, decode
from contracts.pending import PendingCommands
from contracts.topology import Topology
from ops import failpoints
from ops.logs import bound
from ops.postgres import Database, is_transient
from processor import metrics
from processor.batches import Batch, Intents
from processor.intents import FORGET_START, Applied

log = logging.getLogger(__name__)

T = TypeVar("T")

# Unexpected failures of one command before it is dead-lettered.
MAX_FAILURES = 3
# Starts of a redelivered command that never finished (its process died each time, while the
# command ran alone) before it is dead-lettered as poison. More than one, so that a processor
# killed from outside at an unlucky moment does not condemn the command it was applying.
POISON_STARTS = 3
# An ack or reject that takes longer is given up: the broker redelivers the message (its
# channel is gone) and the inbox dedupes it.
SETTLE_TIMEOUT_S = 5.0
# Commands in one batch at most: bounds a transaction's statements and the work lost when a
# batch must be split after a failure.
BATCH_MAX = 128
# Backoff for retries in place: a dependency that is down is asked again at most this often.
RETRY_MAX_S = 5.0

# The transaction that applies the command deletes its row (processor/intents.py).
RECORD_START = """
INSERT INTO command_starts (queue, message_id, starts) VALUES ($1, $2, 1)
ON CONFLICT (queue, message_id)
DO UPDATE SET starts = command_starts.starts + 1, last_at = now()
RETURNING starts
"""


class _Abandoned(Exception):
    """Shutting down while a dependency is unreachable: leave the message unacked."""


class KeyedRunner:
    """Runs jobs one after another per key and concurrently across keys."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._all: set[asyncio.Task[None]] = set()

    def submit(self, key: str, job: Callable[[], Awaitable[None]]) -> None:
        previous = self._tails.get(key)
        task = asyncio.create_task(self._after(previous, job))
        self._tails[key] = task
        self._all.add(task)
        metrics.INTENTS_IN_PROGRESS.set(len(self._tails))

        def forget(done: asyncio.Task[None]) -> None:
            self._all.discard(done)
            if self._tails.get(key) is done:
                del self._tails[key]
                metrics.INTENTS_IN_PROGRESS.set(len(self._tails))

        task.add_done_callback(forget)

    @staticmethod
    async def _after(
        previous: asyncio.Task[None] | None, job: Callable[[], Awaitable[None]]
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await job()

    async def drain(self, within_s: float) -> bool:
        if not self._all:
            return True
        _, pending = await asyncio.wait(list(self._all), timeout=within_s)
        return not pending

    def cancel(self) -> None:
        for task in self._all:
            task.cancel()


class Gate:
    """Shared turns run side by side; an exclusive turn runs alone, once the shared ones under
    way are over, and new shared turns wait for it (so a stream of fresh messages cannot
    starve a redelivered one)."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            async with self._changed:
                self._shared -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting += 1
            try:
                await self._changed.wait_for(lambda: not self._exclusive and not self._shared)
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._changed:
                self._exclusive = False
                self._changed.notify_all()


class Batcher:
    """Gathers the commands of a partition that are ready and applies them together, in one
    transaction per batch (processor/batches.py has the protocol). A command waits only for
    the batch under way: whatever arrives meanwhile forms the next one, so batches grow with
    the load and a lone command goes at once."""

    def __init__(self, pool: Database, batch: Callable[[], Batch], stopping: Callable[[], bool]
                 ) -> None:
        self._pool = pool
        self._batch = batch
        self._stopping = stopping
        self._waiting: list[tuple[Command, asyncio.Future[Applied | None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(_Abandoned())

    async def submit(self, command: Command) -> Applied | None:
        """The command's outcome; None when it must be applied alone (its batch failed for a
        reason of its own); _Abandoned at shutdown while the database is unavailable."""
        future: asyncio.Future[Applied | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((command, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # One turn of the loop lets the other commands delivered together join.
            await asyncio.sleep(0)
            while self._waiting:
                batch = self._waiting[:BATCH_MAX]
                del self._waiting[:BATCH_MAX]
                try:
                    await self._flush(batch)
                except Exception as exc:  # never leave a command waiting on a lost batch
                    log.exception("batch flush failed", exc_info=exc)
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)

    async def _flush(self, batch: list[tuple[Command, asyncio.Future[Applied | None]]]) -> None:
        delay = 0.1
        while True:
            started = time.perf_counter()
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    results = await self._batch().apply(conn, [c for c, _ in batch])
            except Exception as exc:
                if not is_transient(exc):
                    metrics.BATCHES.labels("split").inc()
                    log.warning("batch failed; its commands are applied one by one",
                                extra={"ids": {"commands": len(batch), "error": repr(exc)}})
                    for _, future in batch:
                        future.set_result(None)
                    return
                metrics.TRANSIENT_FAILURES.labels("apply").inc()
                log.warning("batch failed, retrying", extra={"ids": {"error": repr(exc)}})
                if self._stopping():
                    for _, future in batch:
                        future.set_exception(_Abandoned())
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            failpoints.hit("processor.after_batch_commit")
            metrics.BATCHES.labels("applied").inc()
            metrics.BATCH_SIZE.observe(len(batch))
            metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
            return


class PartitionConsumer:
    def __init__(
        self,
        connection: aio_pika.abc.AbstractRobustConnection,
        topology: Topology,
        partition: int,
        intents: Intents,
        pending: PendingCommands,
        on_attempts: Callable[[list[Any]], None],
        prefetch: int,
        db: Database,
        gate: Gate,
        batch: Callable[[], Batch] | None = None,
        on_tasks: Callable[[list[str]], None] | None = None,
        on_refunds: Callable[[list[str]], None] | None = None,
    ) -> None:
        self._connection = connection
        self._queue_name = topology.queue(partition)
        self._intents = intents
        self._pending = pending
        self._on_attempts = on_attempts
        self._on_tasks = on_tasks
        self._on_refunds = on_refunds
        self._prefetch = prefetch
        self._db = db
        self._gate = gate
        self._runner = KeyedRunner()
        self._stopping = False
        self._batcher = None if batch is None else Batcher(db, batch, lambda: self._stopping)
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self) -> None:
        if self._batcher is not None:
            self._batcher.start()
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self._prefetch)
        self._queue = await self._channel.get_queue(self._queue_name, ensure=True)
        self._tag = await self._queue.consume(self._on_message)

    @property
    def ready(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        # Called in delivery order; submit() runs before any await, so order is kept.
        try:
            command = decode(message.body)
        except CommandDecodeError as exc:
            metrics.COMMANDS.labels("undecodable", "dead_lettered").inc()
            log.error("undecodable message dead-lettered",
                      extra={"ids": {"message_id": message.message_id, "error": str(exc)}})
            await self._settle(message, dead_letter=True)
            return
        self._runner.submit(command.intent_id, lambda: self._handle(message, command))

    async def _handle(
        self, message: aio_pika.abc.AbstractIncomingMessage, command: Command
    ) -> None:
        with bound(request_id=command.request_id, account=command.account_id,
                   intent=command.intent_id, message_id=command.message_id):
            suspect = bool(message.redelivered)
            try:
                async with self._gate.exclusive() if suspect else self._gate.shared():
                    result = await self._run(command, suspect)
            except _Abandoned:
                log.warning("left unacked at shutdown; it is redelivered to the next consumer")
                return
            if result is None:
                await self._settle(message, dead_letter=True)
                return
            if isinstance(command, ClientCommand):
                await self._clear_pending(command)
            await self._settle(message)
            if result.attempts:
                self._on_attempts(result.attempts)
            if result.refunds and self._on_refunds is not None:
                self._on_refunds(result.refunds)
            if result.tasks and self._on_tasks is not None:
                self._on_tasks(result.tasks)

    async def _run(self, command: Command, suspect: bool) -> Applied | None:
        """The result, or None when the command is to be dead-lettered."""
        journal = (self._queue_name, command.message_id) if suspect else None
        if journal is not None:
            starts: int = await self._retrying(
                lambda: self._db.fetchval(RECORD_START, *journal))
            if starts > POISON_STARTS:
                metrics.COMMANDS.labels(command.TYPE, "dead_lettered").inc()
                log.error("command killed the processor each time it ran; dead-lettered",
                          extra={"ids": {"starts": starts - 1}})
                await self._forget_start(journal)
                return None
        failpoints.hit("processor.apply", getattr(command, "description", None))
        if journal is None and self._batcher is not None:
            started = time.perf_counter()
            batched = await self._batcher.submit(command)
            if batched is not None:
                self._applied(command, batched, started)
                return batched
        result = await self._apply(command, journal)
        if result is None and journal is not None:
            await self._forget_start(journal)
        return result

    def _applied(self, command: Command, result: Applied, started: float) -> None:
        metrics.APPLY_SECONDS.labels(command.TYPE).observe(time.perf_counter() - started)
        metrics.SETTLE_LAG.labels(command.TYPE).observe(
            max(time.time() - command.accepted_at, 0.0))
        metrics.COMMANDS.labels(command.TYPE, result.outcome).inc()
        log.info(f"command {result.outcome}", extra={"ids": {
            "command": command.TYPE, "detail": result.detail}})

    async def _apply(self, command: Command, journal: tuple[str, str] | None) -> Applied | None:
        failures = 0
        delay = 0.1
        while True:
            started = time.perf_counter()
            try:
                result = await self._intents.apply(command, journal=journal)
            except Exception as exc:
                if is_transient(exc):
                    metrics.TRANSIENT_FAILURES.labels("apply").inc()
                    log.warning("apply failed, retrying", extra={"ids": {"error": repr(exc)}})
                else:
                    failures += 1
                    log.exception("apply failed", extra={"ids": {"failures": failures}})
                    if failures >= MAX_FAILURES:
                        metrics.COMMANDS.labels(command.TYPE, "dead_lettered").inc()
                        return None
            else:
                self._applied(command, result, started)
                return result
            delay = await self._pause(delay)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, retried in place while the database is unavailable."""
        delay = 0.1
        while True:
            try:
                return await call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                metrics.TRANSIENT_FAILURES.labels("apply").inc()
                log.warning("database unavailable, retrying", extra={"ids": {
                    "error": repr(exc)}})
            delay = await self._pause(delay)

    async def _pause(self, delay: float) -> float:
        if self._stopping:
            raise _Abandoned
        await asyncio.sleep(delay)
        return min(delay * 2, RETRY_MAX_S)

    async def _forget_start(self, journal: tuple[str, str]) -> None:
        try:
            await self._db.execute(FORGET_START, *journal)
        except Exception as exc:
            # The sweeper deletes journal rows left this long.
            log.warning("could not forget a command's start", extra={"ids": {
                "error": repr(exc)}})

    async def _clear_pending(self, command: ClientCommand) -> None:
        try:
            await self._pending.remove(command.account_id, command.intent_id,
                                       command.idempotency_key)
        except Exception as exc:
            # Harmless: the edge checks pending entries against the inbox and drops applied ones.
            metrics.TRANSIENT_FAILURES.labels("pending_marker").inc()
            log.warning("could not clear the pending marker", extra={"ids": {"error": repr(exc)}})

    async def _settle(self, message: aio_pika.abc.AbstractIncomingMessage, *,
                      dead_letter: bool = False) -> None:
        try:
            # An ack on a connection that dies under it may wait forever for its frame to be
            # written, and hold up every later command of the intent.
            async with asyncio.timeout(SETTLE_TIMEOUT_S):
                if dead_letter:
                    await message.reject(requeue=False)
                else:
                    await message.ack()
        except Exception as exc:
            # The channel closed under us: the message is redelivered and deduped by the inbox.
            log.warning("could not settle message", extra={"ids": {"error": repr(exc)}})

    async def stop(self, grace_s: float) -> None:
        """Stop taking messages, finish the ones in hand, then close the channel (anything
        still unacked goes back to the queue for the next consumer)."""
        self._stopping = True
        if self._queue is not None and self._tag is not None:
            try:
                # Bounded: on a connection that is down, a robust queue waits for it to come
                # back before cancelling; the broker forgets a dead connection's consumer anyway.
                async with asyncio.timeout(SETTLE_TIMEOUT_S):
                    await self._queue.cancel(self._tag)
            except Exception as exc:
                log.warning("could not cancel consumer", extra={"ids": {"error": repr(exc)}})
        if not await self._runner.drain(grace_s):
            log.warning("shutdown grace over; unfinished commands will be redelivered")
            self._runner.cancel()
            await self._runner.drain(1.0)
        if self._batcher is not None:
            await self._batcher.stop()
        if self._channel is not None:
            try:
                async with asyncio.timeout(SETTLE_TIMEOUT_S):
                    await self._channel.close()
            except Exception as exc:
                log.warning("could not close the channel", extra={"ids": {"error": repr(exc)}})
