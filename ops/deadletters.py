"""The dead-letter queue: list what landed there, and replay it once the cause is fixed.

Messages are dead-lettered when they cannot be decoded, when applying them kept failing, or
when their delivery limit ran out. Replaying publishes a message again to the exchange and
routing key it was first dead-lettered from, with a publisher confirm, and only then removes
it from the dead-letter queue: a crash in between leaves a copy in both, and the processor's
inbox dedupes the duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import aio_pika

from contracts.topology import Topology, declare
from ops.settings import Settings


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    return deaths[0] if isinstance(deaths, list) and deaths else {}


def describe(message: aio_pika.abc.AbstractIncomingMessage) -> dict[str, Any]:
    headers: dict[str, Any] = dict(message.headers or {})
    first = _first_death(headers)
    return {
        "message_id": message.message_id,
        "type": message.type,
        "intent": headers.get("intent_id"),
        "account": headers.get("account_id"),
        "reason": _text(headers.get("x-first-death-reason") or first.get("reason")),
        "queue": _text(headers.get("x-first-death-queue") or first.get("queue")),
        "deaths": first.get("count"),
        "body": message.body[:300].decode(errors="replace"),
    }


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


async def _drain(channel: aio_pika.abc.AbstractChannel, topology: Topology,
                 limit: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    await declare(channel, topology)
    queue = await channel.get_queue(topology.dead)
    messages: list[aio_pika.abc.AbstractIncomingMessage] = []
    while len(messages) < limit:
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            break
        messages.append(message)
    return messages


async def list_dead(settings: Settings, limit: int = 100) -> list[dict[str, Any]]:
    """Look without taking: every message fetched goes back when the channel closes."""
    topology = Topology(settings.amqp_prefix, settings.partitions)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        messages = await _drain(channel, topology, limit)
        found = [describe(m) for m in messages]
        for message in messages:
            await message.nack(requeue=True)
    return found


async def replay_dead(settings: Settings, message_ids: Iterable[str] | None,
                      limit: int = 10_000) -> list[str]:
    """Replay the given messages (all of them when `message_ids` is None)."""
    wanted = None if message_ids is None else set(message_ids)
    topology = Topology(settings.amqp_prefix, settings.partitions)
    connection = await aio_pika.connect(settings.amqp_url)
    replayed: list[str] = []
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        messages = await _drain(channel, topology, limit)
        for message in messages:
            if wanted is not None and message.message_id not in wanted:
                await message.nack(requeue=True)
                continue
            headers: dict[str, Any] = dict(message.headers or {})
            first = _first_death(headers)
            exchange_name = _text(first.get("exchange")) or topology.commands
            routing_keys = first.get("routing-keys") or [""]
            for key in ("x-death", "x-first-death-reason", "x-first-death-queue",
                        "x-first-death-exchange", "x-last-death-reason",
                        "x-last-death-queue", "x-last-death-exchange", "x-delivery-count"):
                headers.pop(key, None)
            exchange = await channel.get_exchange(exchange_name)
            await exchange.publish(
                aio_pika.Message(
                    body=message.body, headers=headers, content_type=message.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message.message_id, type=message.type,
                    correlation_id=message.correlation_id),
                routing_key=_text(routing_keys[0]), mandatory=True)
            await message.ack()
            replayed.append(message.message_id or "")
    return replayed
