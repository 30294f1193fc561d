"""The status fan-out: every event that leaves the outbox also reaches `{prefix}.status`
(contracts/topology.py); this consumer turns each one into a PUBLISH on its PaymentIntent's
Redis channel (contracts/status.py), where the edges' long-polls wait (edge/waiters.py).

It runs in the processor because the processor already holds a broker connection and a Redis
client, and runs wherever payments move: one more consumer on a queue, no new process to
deploy. Several processors share the queue as competing consumers; each notification needs
to be published once, by any of them, since every edge subscribes to Redis, not to the queue.

Protocol. Messages are taken up to PREFETCH at a time; those already delivered are published
to Redis in one pipeline, then acked together (`multiple`) once Redis took them. Whatever fails
(Redis or the broker down) raises out of the body: the unacked messages return to the queue
when the channel closes, and the loop (ops.loops.Loop) runs the body again on a new channel
after a backoff. So notifications are at least once while they live; a duplicate only makes a
waiter look again. One lost for good (expired in the queue during a long outage, or published
while an edge was reconnecting) makes its waiter answer at its deadline, with the state as it
is then: never a wrong answer, only a later one.
"""

from __future__ import annotations

import asyncio
import logging

import aio_pika
import orjson
import redis.asyncio as aioredis

from contracts import status
from contracts.topology import Topology, declare_events, opened_channel
from ops.loops import Loop
from processor import metrics

log = logging.getLogger(__name__)

# Notifications in hand at once; one Redis pipeline carries as many as are ready.
PREFETCH = 256
# An idle consumer shows it is alive this often (and notices a channel the broker closed).
IDLE_S = 1.0
BROKER_TIMEOUT_S = 5.0


class StatusFanout:
    def __init__(
        self,
        connection: aio_pika.abc.AbstractRobustConnection,
        redis: aioredis.Redis,
        topology: Topology,
        deployment: str,
    ) -> None:
        self._amqp = connection
        self._redis = redis
        self._topology = topology
        self._deployment = deployment

    async def run(self, loop: Loop) -> None:
        """The fan-out's body: returns or raises only when it must start over."""
        delivered: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        async with opened_channel(self._amqp, BROKER_TIMEOUT_S, prefetch=PREFETCH) as channel:
            # Bounded, as every call to the broker here.
            async with asyncio.timeout(BROKER_TIMEOUT_S):
                # A queue deleted by an operator comes back with its binding.
                await declare_events(channel, self._topology)
                queue = await channel.get_queue(self._topology.status)
                await queue.consume(delivered.put)
            while True:
                try:
                    async with asyncio.timeout(IDLE_S):
                        first = await delivered.get()
                except TimeoutError:
                    if channel.is_closed:
                        raise ConnectionError("the status channel was closed") from None
                    loop.beat()
                    continue
                batch = [first]
                while not delivered.empty() and len(batch) < PREFETCH:
                    batch.append(delivered.get_nowait())
                await self._publish(batch)
                async with asyncio.timeout(BROKER_TIMEOUT_S):
                    await batch[-1].ack(multiple=True)
                loop.beat()

    async def _publish(self, batch: list[aio_pika.abc.AbstractIncomingMessage]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            count = 0
            for message in batch:
                target = self._target(message)
                if target is None:
                    continue
                pipe.publish(target, orjson.dumps({"event": message.message_id,
                                                   "type": message.type}))
                count += 1
            if count:
                await pipe.execute()
        metrics.STATUS_NOTIFICATIONS.inc(count)

    def _target(self, message: aio_pika.abc.AbstractIncomingMessage) -> str | None:
        """The Redis channel of the event's intent; None for an event of no intent, or one
        that does not decode (counted and dropped: it can only come from outside payonce,
        and redelivering it would not make it decode)."""
        account_id = (message.headers or {}).get("account_id")
        try:
            intent_id = status.intent_of(orjson.loads(message.body))
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            intent_id = None
            metrics.STATUS_UNREADABLE.inc()
            log.warning("status fan-out dropped an event it cannot read", extra={"ids": {
                "message_id": message.message_id}})
        if intent_id is None or not isinstance(account_id, str):
            return None
        return status.channel(self._deployment, account_id, intent_id)
