"""RabbitMQ names and declarations shared by the edge (publisher) and the processor.

Commands go to N partition queues by a stable hash of the intent id, so every command of one
intent lands on one queue, in order; single-active-consumer gives each queue one consumer at a
time, with fail-over to a standby processor.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import aio_pika
from pamqp.commands import Basic

from contracts.commands import Command

# Quorum queues count every return of a message as a delivery, also the returns of all the
# messages a consumer held when its channel closed (a broker restart, a processor killed with
# `prefetch` commands in hand). A low limit would dead-letter healthy commands for their
# neighbours' trouble, so the broker's limit is only a backstop against a message looping
# forever; the processor itself isolates a command that crashes it (processor/consumer.py) or
# keeps failing, long before this.
DELIVERY_LIMIT = 1000
# Events wait for the webhook dispatcher in this queue; it must not swallow the broker's
# memory: past this many the relay's publishes are refused, it stops, and its lag alert fires.
WEBHOOK_QUEUE_MAX = 1_000_000


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str
    partitions: int

    @property
    def commands(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_notices(self) -> str:
        """A copy of every dead-lettered message, for the processor to clear what it left
        behind (pending markers) and count it; the dead-letter queue itself waits for people."""
        return f"{self.prefix}.dead.notices"

    @property
    def webhooks(self) -> str:
        """The durable queue every event must reach: the webhook dispatcher's."""
        return f"{self.prefix}.webhooks"

    def queue(self, partition: int) -> str:
        return f"{self.prefix}.commands.{partition}"

    def partition(self, intent_id: str) -> int:
        return zlib.crc32(intent_id.encode()) % self.partitions

    def routing_key(self, intent_id: str) -> str:
        return str(self.partition(intent_id))

    def queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": self.dead,
            # at-least-once dead-lettering needs reject-publish overflow.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


async def declare(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """Declare every exchange and queue; idempotent, run by each process at start."""
    kind = aio_pika.ExchangeType
    dead = await channel.declare_exchange(topology.dead, kind.FANOUT, durable=True)
    for name in (topology.dead, topology.dead_notices):
        queue = await channel.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(dead)
    commands = await channel.declare_exchange(topology.commands, kind.DIRECT, durable=True)
    for partition in range(topology.partitions):
        queue = await _declare_partition(channel, topology, partition)
        await queue.bind(commands, routing_key=str(partition))
    await declare_events(channel, topology)


async def declare_events(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """The events exchange and the queue every event must reach."""
    events = await channel.declare_exchange(
        topology.events, aio_pika.ExchangeType.TOPIC, durable=True)
    webhooks = await channel.declare_queue(topology.webhooks, durable=True, arguments={
        "x-queue-type": "quorum", "x-max-length": WEBHOOK_QUEUE_MAX,
        "x-overflow": "reject-publish"})
    await webhooks.bind(events, routing_key="#")


async def _declare_partition(
    channel: aio_pika.abc.AbstractChannel, topology: Topology, partition: int
) -> aio_pika.abc.AbstractQueue:
    """A partition queue, or TopologyMismatch when it exists with other arguments (a queue's
    arguments cannot change in place, and replacing it while an edge may publish to it could
    lose a command)."""
    name = topology.queue(partition)
    try:
        return await channel.declare_queue(
            name, durable=True, arguments=topology.queue_arguments())
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        await channel.reopen()
        existing = await channel.declare_queue(name, passive=True)
        held = existing.declaration_result.message_count or 0
        raise TopologyMismatch(
            f"queue {name} exists with other arguments than {topology.queue_arguments()} and "
            f"holds {held} command(s) ({exc}). Stop every edge, let a processor drain it, "
            f"delete it (rabbitmqctl delete_queue {name}) and start again.") from None


async def delete(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """Delete every queue and exchange of a topology, with what they hold (benchmarks and
    tests, which make one of their own)."""
    queues = [topology.queue(p) for p in range(topology.partitions)]
    for queue in (*queues, topology.dead, topology.dead_notices, topology.webhooks):
        await channel.queue_delete(queue)
    for exchange in (topology.commands, topology.events, topology.dead):
        await channel.exchange_delete(exchange)


class TopologyMismatch(Exception):
    """A queue exists with arguments payonce cannot use; only an operator can replace it."""


class PublishFailed(Exception):
    """RabbitMQ did not confirm a command.

    `maybe_queued` is False only when the broker certainly does not hold it (it refused it,
    could not route it, or the channel was closed before anything was sent); after a timeout
    or a connection lost while waiting, the command may be queued and applied later.
    """

    def __init__(self, message: str, *, maybe_queued: bool) -> None:
        super().__init__(message)
        self.maybe_queued = maybe_queued


class CommandPublisher:
    """Publishes commands to their intent's partition and waits for the broker's confirm."""

    def __init__(
        self, channel: aio_pika.abc.AbstractChannel, topology: Topology, timeout_s: float
    ) -> None:
        self._channel = channel
        self._topology = topology
        self._timeout_s = timeout_s
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    @property
    def ready(self) -> bool:
        return not self._channel.is_closed

    async def publish(self, command: Command, *, timeout_s: float | None = None) -> None:
        message = aio_pika.Message(
            body=command.encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=command.message_id,
            type=command.TYPE,
            correlation_id=command.request_id,
            headers={"intent_id": command.intent_id, "account_id": command.account_id},
        )
        try:
            if self._channel.is_closed:
                raise aio_pika.exceptions.ChannelInvalidStateError("closed")
            if self._exchange is None:
                self._exchange = await self._channel.get_exchange(self._topology.commands)
        except (TimeoutError, ConnectionError, RuntimeError, aio_pika.exceptions.AMQPError) as exc:
            # Nothing was sent: ChannelInvalidStateError is a RuntimeError.
            raise PublishFailed(f"RabbitMQ is unavailable: {exc!r}", maybe_queued=False) from exc
        try:
            # mandatory: an unroutable command fails the publish instead of vanishing.
            confirmation = await self._exchange.publish(
                message,
                routing_key=self._topology.routing_key(command.intent_id),
                mandatory=True,
                timeout=self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s),
            )
        except aio_pika.exceptions.DeliveryError as exc:
            # A nack: the broker refused the command (e.g. the queue is full).
            raise PublishFailed(f"refused by RabbitMQ: {exc}", maybe_queued=False) from exc
        except (TimeoutError, ConnectionError, RuntimeError, aio_pika.exceptions.AMQPError) as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}", maybe_queued=True) from exc
        if not isinstance(confirmation, Basic.Ack):
            raise PublishFailed(f"not routed: {confirmation!r}", maybe_queued=False)
