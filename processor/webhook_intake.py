"""Webhook intake: every event becomes one delivery per endpoint that subscribed to it.

The outbox relay publishes every event to `{prefix}.events`, which routes each one to the
durable queue `{prefix}.webhooks`. The intake consumes that queue and takes what is ready in
batches: for each event, one webhook_deliveries row per enabled, undeleted endpoint of the
event's account whose `enabled_events` receive it (contracts/webhooks.receives), all inserted
in one statement, `ON CONFLICT (endpoint_id, event_id) DO NOTHING`, with a due time of now.
The same statement records the first attempt of those the dispatcher sends itself, under its
lease (processor/webhooks.py: Deliverer.reserve and hand_off), so a new delivery is sent
without a claim. The batch's messages are acked only after that statement committed.

A dispatcher that dies before the commit leaves its messages unacked: the broker gives them to
another consumer (or to the same one, restarted) and the batch is recorded then. One that dies
after the commit and before the acks has them recorded twice, which the unique key makes a
no-op; so several dispatchers may consume the queue at once. A database that is unavailable
is retried in place, never by requeueing (quorum queues count returns). A message that is not
an event, or names an event the database does not have, is acked with a log line and a
metric: there is nothing to deliver and it must not come back. An event whose recording keeps
failing for a reason of its own (not the database being away) is tried alone, and if it still
fails, acked with an error log and counted as failed, so it cannot hold up the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

import aio_pika
import orjson

from contracts import ids
from contracts.topology import Topology, declare_events, opened_channel
from contracts.webhooks import receives
from ops.loops import Loop
from ops.postgres import Database, is_transient
from processor import webhook_metrics as metrics

log = logging.getLogger(__name__)

# Unacked messages the broker hands the intake at once, and the most taken in one batch.
PREFETCH = 1000
BATCH = 500
# How long the intake waits for a message before it checks its channel and beats.
CHECK_S = 1.0
# Retries of a database that is away: from 0.1 s doubling to 5 s.
RETRY_START_S = 0.1
RETRY_MAX_S = 5.0
# An ack that takes longer is given up with the channel: the message comes back and is
# recorded again, as a no-op.
ACK_TIMEOUT_S = 5.0

# Every event of the batch (LEFT JOIN: one that no endpoint receives still shows it exists),
# with each enabled endpoint of its account.
MATCH = """
SELECT ev.id AS event_id, ev.seq, ev.object_id, ev.type, ev.account_id, ev.created, ev.data,
       ev.previous_attributes, ev.request_id, ev.idempotency_key,
       e.id AS endpoint_id, e.enabled_events, e.url
FROM events ev
LEFT JOIN webhook_endpoints e
    ON e.account_id = ev.account_id AND e.status = 'enabled' AND e.deleted_at IS NULL
WHERE ev.id = ANY($1::text[])
ORDER BY ev.seq
"""
# A delivery with a place (> 0) in one of this dispatcher's chains is recorded under its lease,
# its first attempt claimed (as processor/webhooks.py's CLAIM would), unless an earlier event
# of its object is due for its endpoint and not held by this dispatcher ($10): then it is left
# to a claim, which keeps them in order. Its lease covers the attempts before it in its chain.
INSERT_DELIVERIES = """
INSERT INTO webhook_deliveries (id, account_id, endpoint_id, event_id, object_id, event_seq,
                                exchange, next_attempt_at, attempts, locked_until)
SELECT d.id, d.account_id, d.endpoint_id, d.event_id, d.object_id, d.event_seq, $7, now(),
       CASE WHEN t.take THEN 1 ELSE 0 END,
       CASE WHEN t.take THEN now() + make_interval(secs => $8 * d.place) END
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
            $9::int[])
    AS d (id, account_id, endpoint_id, event_id, object_id, event_seq, place)
CROSS JOIN LATERAL (
    SELECT d.place > 0 AND NOT EXISTS (
        SELECT FROM webhook_deliveries p
        WHERE p.endpoint_id = d.endpoint_id AND p.object_id = d.object_id
          AND p.state = 'pending' AND p.event_seq < d.event_seq
          AND p.next_attempt_at <= now() AND p.id <> ALL($10::text[])) AS take
) t
ON CONFLICT (endpoint_id, event_id) DO NOTHING
RETURNING id, attempts, next_attempt_at, locked_until
"""


class Deliveries(Protocol):
    """What the intake hands its new deliveries to (processor.webhooks.Deliverer)."""

    @property
    def lease_seconds(self) -> float: ...

    def held(self) -> list[str]: ...

    def reserve(self, groups: list[tuple[str, str]]) -> dict[tuple[str, str], int]: ...

    def hand_off(self, places: dict[tuple[str, str], int], rows: list[Mapping[str, Any]],
                 since: float) -> None: ...


class Intake:
    def __init__(
        self,
        pool: Database,
        connection: aio_pika.abc.AbstractRobustConnection,
        topology: Topology,
        secret: bytes,
        deliveries: Deliveries,
    ) -> None:
        self._pool = pool
        self._amqp = connection
        self._topology = topology
        self._secret = secret
        self._deliveries = deliveries

    async def run(self, loop: Loop) -> None:
        """The intake's body (ops.loops.Loop): consume until the channel closes."""
        self._acks = Acks()
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            inbox.put_nowait(message)

        async with opened_channel(self._amqp, ACK_TIMEOUT_S, prefetch=PREFETCH) as channel:
            async with asyncio.timeout(ACK_TIMEOUT_S):
                # Declared again here, so a queue deleted by an operator comes back.
                await declare_events(channel, self._topology)
                queue = await channel.get_queue(self._topology.webhooks)
                await queue.consume(take)
            while True:
                batch = await _collect(inbox)
                if channel.is_closed:
                    raise ConnectionError("the webhook intake's channel closed")
                if batch:
                    await self._take(batch)
                loop.beat()

    async def _take(self, batch: list[aio_pika.abc.AbstractIncomingMessage]) -> None:
        """Collected → recorded in one transaction → acked."""
        events: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}
        for message in batch:
            event_id = _event_id(message.body)
            if event_id is None:
                metrics.EVENTS_TAKEN.labels("not_an_event").inc()
                log.warning("not an event on the webhook queue; dropped", extra={"ids": {
                    "message_id": message.message_id, "bytes": len(message.body)}})
            else:
                events.setdefault(event_id, message)
        failed: set[str] = set()
        known: set[str] = set()
        if events:
            known, failed = await self._record_with_retries(list(events))
        for event_id in events:
            if event_id in failed:
                metrics.EVENTS_TAKEN.labels("failed").inc()
            elif event_id in known:
                metrics.EVENTS_TAKEN.labels("queued").inc()
            else:
                metrics.EVENTS_TAKEN.labels("unknown_event").inc()
                log.warning("event not in the database; nothing to deliver",
                            extra={"ids": {"event": event_id}})
        async with asyncio.timeout(ACK_TIMEOUT_S):
            await self._acks.ack(batch)

    async def _record_with_retries(self, event_ids: list[str]) -> tuple[set[str], set[str]]:
        """(events found, events that failed alone for a reason of their own)."""
        try:
            return await self._retrying(event_ids), set()
        except _OwnFault as exc:
            log.warning("a batch of events failed; recording them one by one",
                        extra={"ids": {"events": len(event_ids), "error": repr(exc.__cause__)}})
        known: set[str] = set()
        failed: set[str] = set()
        for event_id in event_ids:
            try:
                known |= await self._retrying([event_id])
            except _OwnFault as exc:
                failed.add(event_id)
                log.error("could not record the deliveries of an event; it is not delivered",
                          extra={"ids": {"event": event_id, "error": repr(exc.__cause__)}},
                          exc_info=exc.__cause__)
        return known, failed

    async def _retrying(self, event_ids: list[str]) -> set[str]:
        """Record, retried in place while the database is away; _OwnFault for any other
        error."""
        delay = RETRY_START_S
        while True:
            try:
                return await self._record(event_ids)
            except Exception as exc:
                if not is_transient(exc):
                    raise _OwnFault() from exc
                metrics.TRANSIENT_FAILURES.labels("intake").inc()
                log.warning("could not record deliveries; retrying",
                            extra={"ids": {"error": repr(exc), "retry_in_s": round(delay, 2)}})
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _record(self, event_ids: list[str]) -> set[str]:
        known: set[str] = set()
        new: list[dict[str, Any]] = []
        async with self._pool.acquire() as conn:
            for row in await conn.fetch(MATCH, event_ids):
                known.add(row["event_id"])
                if row["endpoint_id"] is None or not receives(row["enabled_events"], row["type"]):
                    continue
                new.append({**dict(row), "id": ids.webhook_delivery_id(
                    self._secret, row["endpoint_id"], row["event_id"])})
            if not new:
                return known
            # In event order (MATCH's), each object's deliveries to an endpoint are a group.
            groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for delivery in new:
                groups.setdefault((delivery["endpoint_id"], delivery["object_id"]),
                                  []).append(delivery)
            pending: dict[str, int] = {}
            for delivery in new:
                pending[delivery["event_id"]] = pending.get(delivery["event_id"], 0) + 1
            places = self._deliveries.reserve(list(groups))
            for key, group in groups.items():
                first = places.get(key, 0)
                for i, delivery in enumerate(group):
                    delivery["place"] = first + i if first else 0
                    delivery["pending_webhooks"] = pending[delivery["event_id"]]
            recorded: list[Mapping[str, Any]] = []
            since = time.monotonic()
            try:
                # One statement, no transaction: it is atomic, and a crash after it leaves
                # the messages unacked, to be recorded again as a no-op. A BEGIN and a COMMIT
                # would be two more round trips for every batch.
                for r in await conn.fetch(
                        INSERT_DELIVERIES, *(
                            [d[c] for d in new] for c in (
                                "id", "account_id", "endpoint_id", "event_id", "object_id",
                                "seq")),
                        self._topology.events, self._deliveries.lease_seconds,
                        [d["place"] for d in new], self._deliveries.held()):
                    recorded.append(r)
            finally:
                # In event order again, whatever order RETURNING gave them in.
                by_id = {d["id"]: (i, d) for i, d in enumerate(new)}
                recorded.sort(key=lambda r: by_id[r["id"]][0])
                self._deliveries.hand_off(
                    places, [{**by_id[r["id"]][1], **r} for r in recorded], since)
        metrics.DELIVERIES_RECORDED.inc(len(recorded))
        return known


class Acks:
    """Acks of one channel's batches: one frame for a batch that holds every message
    delivered since the ones already acked (`multiple`), else one per message.

    Every frame the intake writes costs a system call, and acks were one per event. A
    multiple ack also acks every earlier unacked delivery of the channel, so it is sent only
    when the batch's delivery tags follow, without a gap, the tags all acked: a message that
    is not in the batch (still in the inbox) is never acked before it is recorded.
    """

    def __init__(self) -> None:
        self._through = 0  # every tag up to this is acked; tags start at 1 on a channel
        self._loose: set[int] = set()  # acked tags above it

    async def ack(self, batch: list[aio_pika.abc.AbstractIncomingMessage]) -> None:
        tags = sorted(m.delivery_tag for m in batch if m.delivery_tag is not None)
        first = self._through + 1
        if batch and len(tags) == len(batch) and tags == list(range(first, first + len(tags))):
            await batch[[m.delivery_tag for m in batch].index(tags[-1])].ack(multiple=True)
            self._through = tags[-1]
        else:
            for message in batch:
                await message.ack()
            self._loose.update(tags)
        while self._through + 1 in self._loose:
            self._through += 1
            self._loose.discard(self._through)


class _OwnFault(Exception):
    """Recording failed for a reason other than the database being away (in __cause__)."""


async def _collect(
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """What is ready: waits up to CHECK_S for a first message, then takes, without waiting,
    what else has arrived, up to BATCH."""
    try:
        # Not asyncio.wait_for, which on Python 3.11 can swallow a cancellation.
        async with asyncio.timeout(CHECK_S):
            first = await inbox.get()
    except TimeoutError:
        return []
    batch = [first]
    while len(batch) < BATCH and not inbox.empty():
        batch.append(inbox.get_nowait())
    return batch


def _event_id(body: bytes) -> str | None:
    """The id of an Event as the outbox relay publishes it, or None for anything else."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("object") != "event":
        return None
    event_id = event.get("id")
    if not isinstance(event_id, str) or not event_id.startswith("evt_") or len(event_id) > 64:
        return None
    return event_id
