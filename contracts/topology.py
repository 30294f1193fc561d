"""RabbitMQ names and declarations shared by the edge (publisher) and the processor.

Commands go to N partition queues by a stable hash of the intent id, so every command of one
intent lands on one queue, in order; single-active-consumer gives each queue one consumer at a
time, with fail-over to a standby processor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
from pamqp.commands import Basic

from contracts.commands import Command

log = logging.getLogger(__name__)

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
# The status fan-out's queue (long-polls wake on it): a notification is worth nothing once the
# longest wait it could end is over, so older ones expire, and a fan-out that is down lets the
# oldest go rather than refuse the relay's publishes (which would stop every event).
STATUS_TTL_MS = 60_000
STATUS_QUEUE_MAX = 100_000
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    type: str  # direct, fanout, topic


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class Topology:
    """Every exchange, queue and binding of a deployment, as data: `declare` makes them on a
    broker, `definitions` writes them as a RabbitMQ definitions file, so the two agree."""

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

    @property
    def status(self) -> str:
        """Every event, for the status fan-out (processor/status.py) that wakes long-polls."""
        return f"{self.prefix}.status"

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

    def exchanges(self) -> list[Exchange]:
        return [Exchange(self.dead, "fanout"), Exchange(self.commands, "direct"),
                Exchange(self.events, "topic")]

    def queues(self) -> list[Queue]:
        quorum = {"x-queue-type": "quorum"}
        return [
            Queue(self.dead, quorum),
            Queue(self.dead_notices, quorum),
            *(Queue(self.queue(p), self.queue_arguments()) for p in range(self.partitions)),
            Queue(self.webhooks, {**quorum, "x-max-length": WEBHOOK_QUEUE_MAX,
                                  "x-overflow": "reject-publish"}),
            # Classic: its messages are hints that may be lost (a waiter then answers at its
            # deadline), so they need no replicated log.
            Queue(self.status, {"x-queue-type": "classic", "x-message-ttl": STATUS_TTL_MS,
                                "x-max-length": STATUS_QUEUE_MAX, "x-overflow": "drop-head"}),
        ]

    def bindings(self) -> list[Binding]:
        return [
            Binding(self.dead, self.dead, ""),
            Binding(self.dead, self.dead_notices, ""),
            *(Binding(self.commands, self.queue(p), str(p)) for p in range(self.partitions)),
            Binding(self.events, self.webhooks, "#"),
            Binding(self.events, self.status, "#"),
        ]

    def definitions(self, vhost: str = "/") -> dict[str, Any]:
        """The topology as a RabbitMQ definitions file (rabbitmqctl import_definitions, or the
        management UI's import), for operators who provision brokers ahead of payonce."""
        return {
            "vhosts": [{"name": vhost}],
            "exchanges": [{"name": e.name, "vhost": vhost, "type": e.type, "durable": True,
                           "auto_delete": False, "internal": False, "arguments": {}}
                          for e in self.exchanges()],
            "queues": [{"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False,
                        "arguments": q.arguments} for q in self.queues()],
            "bindings": [{"source": b.exchange, "vhost": vhost, "destination": b.queue,
                          "destination_type": "queue", "routing_key": b.routing_key,
                          "arguments": {}} for b in self.bindings()],
            "policies": [],
        }


async def declare(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """Declare every exchange, queue and binding; idempotent, run by each process at start."""
    await _declare(channel, topology, topology.exchanges(), topology.queues(),
                   topology.bindings())


async def declare_events(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """The events exchange and the queues bound to it, with their bindings."""
    bindings = [b for b in topology.bindings() if b.exchange == topology.events]
    queues = {b.queue for b in bindings}
    await _declare(channel, topology,
                   [e for e in topology.exchanges() if e.name == topology.events],
                   [q for q in topology.queues() if q.name in queues], bindings)


async def _declare(channel: aio_pika.abc.AbstractChannel, topology: Topology,
                   exchanges: list[Exchange], queues: list[Queue],
                   bindings: list[Binding]) -> None:
    declared: dict[str, aio_pika.abc.AbstractExchange] = {}
    for e in exchanges:
        declared[e.name] = await channel.declare_exchange(
            e.name, aio_pika.ExchangeType(e.type), durable=True)
    made: dict[str, aio_pika.abc.AbstractQueue] = {}
    for q in queues:
        made[q.name] = await _declare_queue(channel, q)
    for b in bindings:
        await made[b.queue].bind(declared[b.exchange], routing_key=b.routing_key)


async def _declare_queue(
    channel: aio_pika.abc.AbstractChannel, queue: Queue
) -> aio_pika.abc.AbstractQueue:
    """A queue, or TopologyMismatch when it exists with other arguments (a queue's arguments
    cannot change in place, and replacing it while an edge may publish to it could lose a
    command)."""
    try:
        return await channel.declare_queue(queue.name, durable=True, arguments=queue.arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        await channel.reopen()
        existing = await channel.declare_queue(queue.name, passive=True)
        held = existing.declaration_result.message_count or 0
        raise TopologyMismatch(
            f"queue {queue.name} exists with other arguments than {queue.arguments} and "
            f"holds {held} message(s) ({exc}). Stop every edge, let a processor drain it, "
            f"delete it (rabbitmqctl delete_queue {queue.name}) and start again.") from None


async def delete(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """Delete every queue and exchange of a topology, with what they hold (benchmarks and
    tests, which make one of their own)."""
    for queue in topology.queues():
        await channel.queue_delete(queue.name)
    for exchange in topology.exchanges():
        await channel.exchange_delete(exchange.name)


@contextlib.asynccontextmanager
async def opened_channel(
    connection: aio_pika.abc.AbstractRobustConnection, timeout_s: float, *,
    prefetch: int | None = None,
) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel of `connection` (with publisher confirms; `prefetch`: its QoS), for one run
    of a loop that consumes or publishes, closed when the run ends. Opening and closing are
    each bounded by `timeout_s`: a channel opened while the connection comes back, or closed
    over a dead one, can wait for ever, and the loop would stall instead of starting over."""
    channel: aio_pika.abc.AbstractChannel | None = None
    try:
        async with asyncio.timeout(timeout_s):
            channel = await connection.channel()
            if prefetch is not None:
                await channel.set_qos(prefetch_count=prefetch)
        yield channel
    finally:
        if channel is not None:
            await close_quietly(channel.close, timeout_s)


async def close_quietly(close: Callable[[], Awaitable[Any]], timeout_s: float) -> None:
    """Close something a loop is done with, within `timeout_s`. A close that fails or times
    out is only logged: what it closes is gone either way, and the loop goes on."""
    try:
        async with asyncio.timeout(timeout_s):
            await close()
    except Exception as exc:
        log.debug("close failed", extra={"ids": {"error": repr(exc)}})


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


async def publish_confirmed(
    channel: aio_pika.abc.AbstractChannel, exchange: str, routing_key: str, body: bytes,
    properties: aiormq.spec.Basic.Properties, *, timeout_s: float,
) -> Any:
    """Publishes `body` mandatory on `channel` (opened with publisher confirms) and returns the
    broker's answer: Basic.Ack, or the message returned unrouted. A nack raises
    aio_pika.exceptions.DeliveryError.

    Unlike aio-pika's Exchange.publish, this does not hold the channel until the frames are
    on the socket. aiormq does by default (`wait=True`), so each publish of a channel waits in
    line for the writes of all the ones before it, a few turns of the event loop each: a
    busy process then gets a few dozen publishes a second through one channel, and the rest
    time out in the line, unsent. Here the frames go to the connection's writer at once and
    the channel is free for the next publish, so the confirms of any number of publishes are
    awaited together (the broker's confirms, not the line, set the pace), in call order."""
    if channel.is_closed:
        raise aio_pika.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    # The concrete channel: its basic_publish takes `wait`, which the abstract one leaves out.
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    return await underlay.basic_publish(
        body, exchange=exchange, routing_key=routing_key, properties=properties,
        mandatory=True, timeout=timeout_s, wait=False)


class CommandPublisher:
    """Publishes commands to their intent's partition and waits for the broker's confirm.

    Given its `connection`, it opens a new channel when its own is closed while the connection
    is up: a robust channel is meant to come back by itself after a reconnect, and sometimes
    does not, which would leave the process unable to publish for good."""

    def __init__(
        self, channel: aio_pika.abc.AbstractChannel, topology: Topology, timeout_s: float,
        connection: aio_pika.abc.AbstractRobustConnection | None = None,
    ) -> None:
        self._channel = channel
        self._topology = topology
        self._timeout_s = timeout_s
        self._connection = connection
        self._reopening = asyncio.Lock()
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    @property
    def ready(self) -> bool:
        """Its channel is open and, given its connection, that connection is up."""
        up = self._connection is None or self._connection.connected.is_set()
        return up and not self._channel.is_closed

    async def _reopen(self) -> None:
        """A new channel, if the old one is closed and the connection is up; once for every
        publish that found it closed at the same time."""
        if self._connection is None or not self._connection.connected.is_set():
            return
        async with self._reopening:
            if not self._channel.is_closed:
                return
            async with asyncio.timeout(self._timeout_s):
                channel = await self._connection.channel(publisher_confirms=True)
            log.warning("publisher channel closed; a new one is open")
            old, self._channel, self._exchange = self._channel, channel, None
            # Closed on purpose, so it is not brought back beside the new one.
            await close_quietly(old.close, self._timeout_s)

    async def publish(self, command: Command, *, timeout_s: float | None = None) -> None:
        """Returns once the broker confirmed the command, waiting `timeout_s` for it (the
        publisher's own timeout by default); PublishFailed otherwise."""
        body = command.encode()
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=PERSISTENT,
            message_id=command.message_id,
            message_type=command.TYPE,
            correlation_id=command.request_id,
            headers={"intent_id": command.intent_id, "account_id": command.account_id},
        )
        try:
            if self._channel.is_closed:
                await self._reopen()
            if self._channel.is_closed:
                raise aio_pika.exceptions.ChannelInvalidStateError("closed")
            if self._exchange is None:
                self._exchange = await self._channel.get_exchange(self._topology.commands)
        except (TimeoutError, ConnectionError, RuntimeError, aio_pika.exceptions.AMQPError) as exc:
            # Nothing was sent: ChannelInvalidStateError is a RuntimeError.
            raise PublishFailed(f"RabbitMQ is unavailable: {exc!r}", maybe_queued=False) from exc
        try:
            # mandatory: an unroutable command fails the publish instead of vanishing.
            confirmation = await publish_confirmed(
                self._channel, self._exchange.name,
                self._topology.routing_key(command.intent_id), body, properties,
                timeout_s=self._timeout_s if timeout_s is None else timeout_s)
        except aio_pika.exceptions.DeliveryError as exc:
            # A nack: the broker refused the command (e.g. the queue is full).
            raise PublishFailed(f"refused by RabbitMQ: {exc}", maybe_queued=False) from exc
        except Exception as exc:
            # A timeout or a lost connection; aiormq also fails the confirms still awaited
            # with the channel's close reason, which may be a bare Exception. The frames may
            # have been sent either way.
            raise PublishFailed(f"{type(exc).__name__}: {exc}", maybe_queued=True) from exc
        if not isinstance(confirmation, Basic.Ack):
            raise PublishFailed(f"not routed: {confirmation!r}", maybe_queued=False)
