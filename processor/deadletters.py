"""The dead-letter watcher: sees a copy of every dead-lettered message.

The dead-letter exchange is a fanout to two queues: `{prefix}.dead`, which keeps the messages
for an operator (`payonce dead list|replay`), and `{prefix}.dead.notices`, consumed here. For
each message, whoever dead-lettered it (the processor, or the broker when a delivery limit ran
out), the watcher removes the pending marker of its command, so reads stop announcing a
command that will not be applied, counts it by reason and logs it. A replayed command is
applied as usual; until then the intent reads as it is in Postgres.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aio_pika

from contracts.commands import ClientCommand, CommandDecodeError, decode
from contracts.pending import PendingCommands
from contracts.topology import Topology, opened_channel
from ops.loops import Loop
from processor import metrics

log = logging.getLogger(__name__)

# How often the watcher checks its channel while no dead letters arrive.
CHECK_S = 1.0


class DeadLetterWatcher:
    def __init__(
        self,
        connection: aio_pika.abc.AbstractRobustConnection,
        topology: Topology,
        pending: PendingCommands,
    ) -> None:
        self._amqp = connection
        self._queue_name = topology.dead_notices
        self._pending = pending

    async def run(self, loop: Loop) -> None:
        """The watcher's body (ops.loops.Loop): consume until the channel closes."""
        async with opened_channel(self._amqp, CHECK_S * 5, prefetch=50) as channel:
            async with asyncio.timeout(CHECK_S * 5):
                queue = await channel.get_queue(self._queue_name, ensure=True)
                await queue.consume(self._on_message)
            while not channel.is_closed:
                loop.beat()
                await asyncio.sleep(CHECK_S)
            raise ConnectionError("the dead-letter watcher's channel closed")

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        headers: dict[str, Any] = dict(message.headers or {})
        reason = _text(headers.get("x-first-death-reason")) or "unknown"
        try:
            command = decode(message.body)
        except CommandDecodeError:
            command = None
        try:
            if isinstance(command, ClientCommand):
                await self._pending.remove(command.account_id, command.intent_id,
                                           command.idempotency_key)
        except Exception as exc:
            # Redis is down: the notice comes back (after a pause, not in a tight loop).
            log.warning("could not clear the marker of a dead-lettered command",
                        extra={"ids": {"message_id": message.message_id, "error": repr(exc)}})
            await asyncio.sleep(CHECK_S)
            async with asyncio.timeout(CHECK_S * 5):
                await message.nack(requeue=True)
            return
        metrics.DEAD_LETTERS.labels(reason).inc()
        log.error("command dead-lettered; it waits for `payonce dead replay`", extra={"ids": {
            "message_id": message.message_id, "reason": reason,
            "intent": headers.get("intent_id"), "account": headers.get("account_id")}})
        # Bounded: an ack on a dying connection may never complete (it comes back, and is
        # counted twice; clearing a marker twice is harmless).
        async with asyncio.timeout(CHECK_S * 5):
            await message.ack()


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
