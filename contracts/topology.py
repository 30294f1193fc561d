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

# A message whose consumer crashes this many times is poison: it goes to the dead-letter
# queue instead of crashing the next consumer too.
DELIVERY_LIMIT = 5


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
    durable = aio_pika.ExchangeType
    dead = await channel.declare_exchange(topology.dead, durable.FANOUT, durable=True)
    dead_queue = await channel.declare_queue(
        topology.dead, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_queue.bind(dead)
    commands = await channel.declare_exchange(topology.commands, durable.DIRECT, durable=True)
    for partition in range(topology.partitions):
        queue = await channel.declare_queue(
            topology.queue(partition), durable=True, arguments=topology.queue_arguments()
        )
        await queue.bind(commands, routing_key=str(partition))
    await channel.declare_exchange(topology.events, durable.TOPIC, durable=True)


async def delete(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """Delete every queue and exchange of a topology, with what they hold (benchmarks and
    tests, which make one of their own)."""
    queues = [topology.queue(p) for p in range(topology.partitions)] + [topology.dead]
    for queue in queues:
        await channel.queue_delete(queue)
    for exchange in (topology.commands, topology.events, topology.dead):
        await channel.exchange_delete(exchange)


class PublishFailed(Exception):
    """RabbitMQ did not confirm a command: it may or may not be queued."""


class CommandPublisher:
    """Publishes commands to their intent's partition and waits for the broker's confirm."""

    def __init__(
        self, channel: aio_pika.abc.AbstractChannel, topology: Topology, timeout_s: float
    ) -> None:
        self._channel = channel
        self._topology = topology
        self._timeout_s = timeout_s
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def publish(self, command: Command) -> None:
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
            if self._exchange is None:
                self._exchange = await self._channel.get_exchange(self._topology.commands)
            # mandatory: an unroutable command fails the publish instead of vanishing.
            confirmation = await self._exchange.publish(
                message,
                routing_key=self._topology.routing_key(command.intent_id),
                mandatory=True,
                timeout=self._timeout_s,
            )
        except (
            TimeoutError,
            ConnectionError,
            aio_pika.exceptions.AMQPError,
            aio_pika.exceptions.ChannelInvalidStateError,
        ) as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(confirmation, Basic.Ack):
            raise PublishFailed(f"not confirmed: {confirmation!r}")
