"""Partition consumers: commands of one intent are applied one after another, in the order
the queue delivers them; commands of different intents run concurrently.

A message is acked only after its transaction committed. A message that is not a command, or
whose command keeps failing for a reason other than an unreachable dependency, is rejected
without requeue and so dead-lettered. Unreachable dependencies are retried in place, never by
requeueing: a requeued message would be overtaken by the next command of its intent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aio_pika

from contracts.commands import ClientCommand, Command, CommandDecodeError, decode
from contracts.pending import PendingCommands
from contracts.topology import Topology
from ops.logs import bound
from processor import metrics
from processor.intents import TRANSIENT_ERRORS, Applied, Intents

log = logging.getLogger(__name__)

# Unexpected failures of one command before it is dead-lettered.
MAX_FAILURES = 3
# Backoff for retries in place: a dependency that is down is asked again at most this often.
RETRY_MAX_S = 5.0


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


class PartitionConsumer:
    def __init__(
        self,
        connection: aio_pika.abc.AbstractRobustConnection,
        topology: Topology,
        partition: int,
        intents: Intents,
        pending: PendingCommands,
        on_attempts: Callable[[list[str]], None],
        prefetch: int,
    ) -> None:
        self._connection = connection
        self._queue_name = topology.queue(partition)
        self._intents = intents
        self._pending = pending
        self._on_attempts = on_attempts
        self._prefetch = prefetch
        self._runner = KeyedRunner()
        self._stopping = False
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self) -> None:
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self._prefetch)
        self._queue = await self._channel.get_queue(self._queue_name, ensure=True)
        self._tag = await self._queue.consume(self._on_message)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        # Called in delivery order; submit() runs before any await, so order is kept.
        try:
            command = decode(message.body)
        except CommandDecodeError as exc:
            metrics.COMMANDS.labels("undecodable", "dead_lettered").inc()
            log.error("undecodable message dead-lettered",
                      extra={"ids": {"message_id": message.message_id, "error": str(exc)}})
            await message.reject(requeue=False)
            return
        self._runner.submit(command.intent_id, lambda: self._handle(message, command))

    async def _handle(
        self, message: aio_pika.abc.AbstractIncomingMessage, command: Command
    ) -> None:
        with bound(request_id=command.request_id, account=command.account_id,
                   intent=command.intent_id, message_id=command.message_id):
            try:
                result = await self._apply(command)
            except _Abandoned:
                log.warning("left unacked at shutdown; it is redelivered to the next consumer")
                return
            if result is None:
                await self._settle(message, requeue_dead=True)
                return
            if isinstance(command, ClientCommand):
                await self._clear_pending(command)
            await self._settle(message)
            if result.attempts:
                self._on_attempts(result.attempts)

    async def _apply(self, command: Command) -> Applied | None:
        """The result, or None when the command is to be dead-lettered."""
        failures = 0
        delay = 0.1
        while True:
            started = time.perf_counter()
            try:
                result = await self._intents.apply(command)
            except TRANSIENT_ERRORS as exc:
                metrics.TRANSIENT_FAILURES.labels("apply").inc()
                log.warning("apply failed, retrying", extra={"ids": {"error": repr(exc)}})
            except Exception:
                failures += 1
                log.exception("apply failed", extra={"ids": {"failures": failures}})
                if failures >= MAX_FAILURES:
                    metrics.COMMANDS.labels(command.TYPE, "dead_lettered").inc()
                    return None
            else:
                metrics.APPLY_SECONDS.labels(command.TYPE).observe(time.perf_counter() - started)
                metrics.COMMANDS.labels(command.TYPE, result.outcome).inc()
                log.info(f"command {result.outcome}", extra={"ids": {
                    "command": command.TYPE, "detail": result.detail}})
                return result
            if self._stopping:
                raise _Abandoned
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _clear_pending(self, command: ClientCommand) -> None:
        try:
            await self._pending.remove(command.account_id, command.intent_id,
                                       command.idempotency_key)
        except Exception as exc:
            # Harmless: the edge checks pending entries against the inbox and drops applied ones.
            metrics.TRANSIENT_FAILURES.labels("pending_marker").inc()
            log.warning("could not clear the pending marker", extra={"ids": {"error": repr(exc)}})

    async def _settle(self, message: aio_pika.abc.AbstractIncomingMessage, *,
                      requeue_dead: bool = False) -> None:
        try:
            if requeue_dead:
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
                await self._queue.cancel(self._tag)
            except Exception as exc:
                log.warning("could not cancel consumer", extra={"ids": {"error": repr(exc)}})
        if not await self._runner.drain(grace_s):
            log.warning("shutdown grace over; unfinished commands will be redelivered")
            self._runner.cancel()
            await self._runner.drain(1.0)
        if self._channel is not None:
            await self._channel.close()


