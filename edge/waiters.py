"""Long-polls (`GET …?wait=N`): the requests of one edge process that wait for a
PaymentIntent to change, woken by the status fan-out (processor/status.py) through Redis.

One Redis pub/sub connection serves every waiter of the process, with a table from each
intent's channel (contracts/status.py) to the requests waiting on it. For one request
(`answer_when_changed`):

1. `watch()` registers the waiter; the channel's first waiter queues a SUBSCRIBE.
2. `Watch.ready()` returns once Redis confirmed that subscription. Only then is the state
   read, so a change committed after the read is never missed: its notification is
   published after the commit, to a channel already subscribed, and wakes the waiter.
3. The request waits for a notification or its deadline, reads again, and answers as soon
   as what it reads differs from what it first read (or nothing is under way any more); at
   the deadline it answers what it reads then. Nothing polls Postgres: a read follows a
   notification, or the deadline.
4. Leaving `watch()`, whatever the reason (an answer, the deadline, the client gone, a
   cancellation), removes the waiter without awaiting anything, so nothing can skip it; the
   channel's last waiter queues an UNSUBSCRIBE.

Confirmations are counted. Redis answers every SUBSCRIBE and UNSUBSCRIBE naming one channel
with one reply, in the order the commands were sent, and one writer sends the queued
commands in the order they were numbered: the n-th reply confirms the n-th command. A waiter
waits for the reply to the SUBSCRIBE its channel rests on.

The connection is the body of a supervised loop (ops.loops.Loop). When it fails, pending
confirmations fail and the loop connects again, subscribes every channel of the table anew
and wakes every waiter: notifications published meanwhile were lost, so each waiter waits
for its new subscription and reads again. A connection that went silent is found by a PING
when nothing came for PING_S.

When the edge stops, every waiter answers at once with the state then (`release_all`).

The number of waiters is bounded (`max_waiters`): past it a request that would wait is
refused at once (429), rather than holding a socket and memory the process may not have.
aiohttp does not cancel a handler whose client went away, so a waiter also checks its
connection every CLIENT_CHECK_S (a local check: nothing is read) and leaves when it closed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from contracts import status
from contracts.errors import PayonceError, RateLimited, ServiceUnavailable
from edge import metrics
from ops.loops import Loop

log = logging.getLogger(__name__)

# The longest `wait` a request may ask for, as in Stripe-style long-polls elsewhere: short
# enough for every proxy's idle timeout.
MAX_WAIT_S = 30
# With nothing received for this long, the connection is PINGed; with nothing for twice as
# long, it is taken for dead and opened again.
PING_S = 5.0
# How often a waiter looks whether its client is still connected.
CLIENT_CHECK_S = 1.0


def status_client_name(deployment: str) -> str:
    """How the subscription's connection names itself in Redis (CLIENT LIST)."""
    return f"payonce-edge-status-{deployment}"


class Watch:
    """One waiting request: woken by each notification of its intent."""

    __slots__ = ("_hub", "_woken", "channel")

    def __init__(self, hub: StatusWaiters, channel: str) -> None:
        self.channel = channel
        self._hub = hub
        self._woken = asyncio.Event()

    def wake(self) -> None:
        self._woken.set()

    async def ready(self) -> None:
        """Once Redis confirmed this intent's subscription on the current connection;
        ServiceUnavailable when it cannot within the hub's timeout."""
        await self._hub.confirmed(self.channel)

    async def wait(self, timeout_s: float) -> bool:
        """Whether a notification came (since the last call) within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._woken.wait()
        except TimeoutError:
            return False
        # Cleared before the caller reads again: a notification during that read wakes the
        # next wait at once.
        self._woken.clear()
        return True


class StatusWaiters:
    def __init__(self, redis_url: str, deployment: str, *, max_waiters: int,
                 timeout_s: float) -> None:
        self._redis_url = redis_url
        self._deployment = deployment
        self._max_waiters = max_waiters
        self._timeout_s = timeout_s
        # A channel of the process's own keeps the connection subscribed with no waiter.
        self._keepalive = status.channel(deployment, "edge", f"{id(self):x}-{time.time_ns()}")
        self._channels: dict[str, set[Watch]] = {}
        self._count = 0
        # The current connection's state: reset whenever it fails.
        self._pubsub: PubSub | None = None
        self._up = asyncio.Event()
        self._sent = 0
        self._acked = 0
        self._subscribed_at: dict[str, int] = {}
        self._confirmations: dict[int, asyncio.Future[None]] = {}
        self._outbox: collections.deque[tuple[str, str]] = collections.deque()
        self._queued = asyncio.Event()
        self.releasing = False

    @property
    def waiting(self) -> int:
        return self._count

    def release_all(self) -> None:
        """The edge is stopping: every waiter answers now, with the state as it is, inside
        the shutdown's grace rather than cut off at its end."""
        self.releasing = True
        for watchers in self._channels.values():
            for watch in watchers:
                watch.wake()

    @asynccontextmanager
    async def watch(self, account_id: str, intent_id: str) -> AsyncIterator[Watch]:
        if self._count >= self._max_waiters:
            metrics.LONGPOLLS.labels("refused").inc()
            raise RateLimited(
                f"Too many requests are waiting for changes on this server (at most "
                f"{self._max_waiters}); retry after a moment, or without `wait`.",
                headers={"Retry-After": "1", "Stripe-Should-Retry": "true"})
        channel = status.channel(self._deployment, account_id, intent_id)
        watch = Watch(self, channel)
        watchers = self._channels.setdefault(channel, set())
        if not watchers:
            self._queue("SUBSCRIBE", channel)
        watchers.add(watch)
        self._count += 1
        metrics.LONGPOLL_WAITERS.inc()
        try:
            yield watch
        finally:
            watchers.discard(watch)
            self._count -= 1
            metrics.LONGPOLL_WAITERS.dec()
            if not watchers and self._channels.get(channel) is watchers:
                del self._channels[channel]
                self._queue("UNSUBSCRIBE", channel)

    async def confirmed(self, channel: str) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                while True:
                    await self._up.wait()
                    number = self._subscribed_at.get(channel)
                    if number is None:
                        # Registered while the connection was down and not resubscribed by
                        # its return: only possible if the channel's waiters all left.
                        self._queue("SUBSCRIBE", channel)
                        continue
                    if number <= self._acked:
                        return
                    try:
                        await asyncio.shield(self._confirmations[number])
                    except ConnectionError:
                        continue  # the connection failed: wait for the next one
        except TimeoutError:
            metrics.DEPENDENCY_ERRORS.labels("redis").inc()
            raise ServiceUnavailable(
                "payonce could not subscribe to the intent's changes; retry the request.",
                headers={"Stripe-Should-Retry": "true"}) from None

    def _queue(self, command: str, channel: str) -> None:
        """Number a (UN)SUBSCRIBE and queue it for the writer; nothing while disconnected
        (the next connection subscribes every channel of the table)."""
        if self._pubsub is None:
            return
        self._sent += 1
        if command == "SUBSCRIBE":
            self._subscribed_at[channel] = self._sent
        else:
            self._subscribed_at.pop(channel, None)
        self._confirmations[self._sent] = asyncio.get_running_loop().create_future()
        self._outbox.append((command, channel))
        self._queued.set()

    async def run(self, loop: Loop) -> None:
        """The connection's body, for ops.loops.Loop: returns or raises only when it must
        start over."""
        client = aioredis.from_url(
            self._redis_url, client_name=status_client_name(self._deployment),
            socket_timeout=self._timeout_s,
            socket_connect_timeout=self._timeout_s,
            # A retry inside redis-py would reconnect silently, and the notifications lost
            # meanwhile would go unnoticed: every failure comes out here instead.
            retry=Retry(NoBackoff(), 0))
        pubsub = client.pubsub()
        try:
            await pubsub.ping()  # connects, or fails here
            self._pubsub = pubsub
            self._queue("SUBSCRIBE", self._keepalive)
            for channel in self._channels:
                self._queue("SUBSCRIBE", channel)
            self._up.set()
            for watchers in self._channels.values():
                for watch in watchers:
                    watch.wake()
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._write(pubsub))
                    tasks.create_task(self._read(pubsub, loop))
            except ExceptionGroup as failed:
                # The first failure, as the loop logs and classifies any other.
                raise failed.exceptions[0] from None
        finally:
            self._disconnected()
            for close in (pubsub.aclose, client.aclose):
                try:
                    async with asyncio.timeout(self._timeout_s):
                        await close()
                except Exception as exc:
                    log.debug("close failed", extra={"ids": {"error": repr(exc)}})

    def _disconnected(self) -> None:
        self._pubsub = None
        self._up.clear()
        self._sent = self._acked = 0
        self._subscribed_at.clear()
        self._outbox.clear()
        for future in self._confirmations.values():
            if not future.done():
                future.set_exception(ConnectionError("the status connection failed"))
                future.exception()  # retrieved: a waiter may have left already
        self._confirmations.clear()

    async def _write(self, pubsub: PubSub) -> None:
        while True:
            _honour_cancellation()
            await self._queued.wait()
            self._queued.clear()
            while self._outbox:
                _honour_cancellation()
                command, channel = self._outbox.popleft()
                if command == "SUBSCRIBE":
                    await pubsub.subscribe(channel)
                else:
                    await pubsub.unsubscribe(channel)

    async def _read(self, pubsub: PubSub, loop: Loop) -> None:
        heard = time.monotonic()
        while True:
            _honour_cancellation()
            message = await pubsub.get_message(timeout=PING_S)
            now = time.monotonic()
            if message is None:
                if now - heard > 2 * PING_S:
                    raise ConnectionError(f"Redis sent nothing for {now - heard:.0f} s, not "
                                          "even a PONG")
                await pubsub.ping()
                continue
            heard = now
            loop.beat()
            kind = message["type"]
            if kind in ("subscribe", "unsubscribe"):
                self._acked += 1
                future = self._confirmations.pop(self._acked, None)
                if future is not None and not future.done():
                    future.set_result(None)
            elif kind == "message":
                channel = message["channel"]
                name = channel.decode() if isinstance(channel, bytes) else str(channel)
                metrics.LONGPOLL_NOTIFICATIONS.inc()
                for watch in self._channels.get(name, ()):
                    watch.wake()


def _honour_cancellation() -> None:
    """redis-py writes under asyncio.wait_for, which on Python 3.11 can swallow a
    cancellation that arrives as the write completes; the task then runs on, cancelled in
    name only, and the edge could not stop. Such a cancellation is raised here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@dataclass(frozen=True, slots=True)
class Reading:
    """What a read of the intent would answer: an object, or the error to raise (a 425, a
    404); and whether anything is under way that will change it."""

    answer: dict[str, Any] | PayonceError
    under_way: bool

    @property
    def key(self) -> Any:
        """Equal for readings a client cannot tell apart."""
        if isinstance(self.answer, PayonceError):
            return (self.answer.status, self.answer.code)
        return self.answer


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def answer_when_changed(
    request: web.Request, hub: StatusWaiters, account_id: str, intent_id: str,
    read: Callable[[], Awaitable[Reading]], wait_s: int | None,
) -> Reading:
    """`read()` now when there is nothing to wait for (no `wait`, or nothing under way);
    else its first different reading within `wait_s` seconds, or the reading at the end."""
    if not wait_s:
        return await read()
    async with hub.watch(account_id, intent_id) as watch:
        await watch.ready()
        first = await read()
        if not first.under_way:
            metrics.LONGPOLLS.labels("at_rest").inc()
            return first
        clock = asyncio.get_running_loop()
        deadline = clock.time() + wait_s
        while (remaining := deadline - clock.time()) > 0:
            woken = await watch.wait(min(remaining, CLIENT_CHECK_S))
            if client_gone(request):
                metrics.LONGPOLLS.labels("client_gone").inc()
                return first  # written to no one: nothing more is read for it
            if hub.releasing:
                break
            if not woken:
                continue
            await watch.ready()
            now = await read()
            if now.key != first.key or not now.under_way:
                metrics.LONGPOLLS.labels("changed").inc()
                return now
        metrics.LONGPOLLS.labels("released" if hub.releasing else "deadline").inc()
        return await read()
