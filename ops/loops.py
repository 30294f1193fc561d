"""Background loops that must never stop: the outbox relay, the attempt sweeper, the
dead-letter watcher, the edge's heartbeat.

A loop runs its body again and again. Whatever the body raises (a broker restart closes its
channel, a database restart kills its connection, a bug), the loop logs it, counts it, waits
(doubling from 0.1 s up to `max_backoff_s`) and runs the body again. A body that returns is
run again after the shortest pause. The body calls `beat()` whenever it has shown that it
works (a round trip done, an idle wait over); `alive()` is False once no beat came for
`stale_after_s`, and `/ready` turns red. Only cancellation (shutdown) ends a loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiormq
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from ops.postgres import is_transient

log = logging.getLogger(__name__)

LOOP_FAILURES = Counter(
    "payonce_loop_failures_total", "Exceptions raised by a background loop's body", ["loop"]
)
# Edge workers (ops/workers.py) report the oldest beat of their loops: a stalled one shows.
LOOP_LAST_BEAT = Gauge(
    "payonce_loop_last_beat_timestamp_seconds",
    "Unix time of a background loop's last sign of progress", ["loop"],
    multiprocess_mode="livemin",
)

BACKOFF_START_S = 0.1
# A loop being stopped that has not ended is cancelled again after this long.
STOP_RETRY_S = 1.0


class Loop:
    def __init__(
        self,
        name: str,
        body: Callable[[Loop], Awaitable[None]],
        *,
        stale_after_s: float,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.name = name
        self._body = body
        self._stale_after_s = stale_after_s
        self._max_backoff_s = max_backoff_s
        self._last_beat = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.failures = 0

    def beat(self) -> None:
        self._last_beat = time.monotonic()
        LOOP_LAST_BEAT.labels(self.name).set(time.time())

    def alive(self) -> bool:
        return (self._task is not None and not self._task.done()
                and time.monotonic() - self._last_beat < self._stale_after_s)

    def start(self) -> None:
        self.beat()
        self._task = asyncio.create_task(self._run(), name=f"loop:{self.name}")

    async def _run(self) -> None:
        delay = BACKOFF_START_S
        while not self._stopping:
            try:
                await self._body(self)
                delay = BACKOFF_START_S
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                LOOP_FAILURES.labels(self.name).inc()
                log.warning("background loop failed; running it again",
                            extra={"ids": {"loop": self.name, "error": repr(exc),
                                           "retry_in_s": round(delay, 2)}},
                            exc_info=not _expected(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff_s)

    async def stop(self) -> None:
        """Cancel the loop and wait until it ended. A body may swallow a cancellation (a
        library that catches it, or asyncio.wait_for on Python 3.11 losing one that comes as
        its inner call finishes) and run on: it is cancelled again until it ends, and the
        loop does not start its body again once stopping."""
        if self._task is None:
            return
        self._stopping = True
        while not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task], timeout=STOP_RETRY_S)
        await asyncio.gather(self._task, return_exceptions=True)


def _expected(exc: BaseException) -> bool:
    """Failures of a dependency, logged without a traceback; anything else gets one."""
    return is_transient(exc) or isinstance(
        exc, ConnectionError | RedisError | aiormq.exceptions.AMQPError
        | aiormq.exceptions.ChannelInvalidStateError)


# A dependency that is down must not hold a process that is stopping: it is going anyway.
CLOSE_TIMEOUT_S = 5.0


async def close_all(closers: list[Callable[[], Awaitable[object]]]) -> None:
    """Close what a process opened for its loops, the last opened first, each within
    CLOSE_TIMEOUT_S. A close that fails is logged, and the others still run."""
    for close in reversed(closers):
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await close()
        except Exception as exc:
            log.warning("close failed", extra={"ids": {"error": repr(exc)}})
