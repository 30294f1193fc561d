"""Per-account rate limits, shared by every edge through Redis, as Stripe limits each account.

Each account may send `rate_limit_per_s` requests per second to /v1, with bursts of up to
`rate_limit_burst` beyond the steady rate; a request over the limit is answered 429
`rate_limit` (which Stripe's libraries raise as RateLimitError) before anything else is done,
so a POST refused this way leaves its Idempotency-Key unused. 0 turns limits off.

The limit is a generic cell rate algorithm (GCRA) in one Lua script: `rl:{account}` holds the
theoretical arrival time of the next request, in Redis' own clock (so edges whose clocks
differ agree), and each request is one round trip that checks and advances it atomically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from contracts.errors import RateLimited
from edge import metrics
from edge.keys import ACCOUNT_ID, RATE_LIMITER

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# ARGV: milliseconds per request, milliseconds of burst. Returns 0 when the request may go,
# else the milliseconds until it would.
_GCRA = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now_ms)
if tat < now_ms then tat = now_ms end
local allow_at = tat - burst
if allow_at > now_ms then
  return math.ceil(allow_at - now_ms)
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], next_tat, 'PX', math.ceil(next_tat - now_ms) + 1000)
return 0
"""

MESSAGE = ("Too many requests hit the API too quickly. We recommend an exponential backoff of "
           "your requests.")


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, *, per_s: float, burst: int) -> None:
        self._interval_ms = 1000.0 / per_s
        self._burst_ms = self._interval_ms * burst
        self._script = redis.register_script(_GCRA)

    async def check(self, account_id: str) -> None:
        """RateLimited when the account is over its limit."""
        wait_ms = await self._script(keys=[f"rl:{account_id}"],
                                     args=[self._interval_ms, self._burst_ms])
        if wait_ms:
            metrics.RATE_LIMITED.inc()
            raise RateLimited(MESSAGE, headers={
                "Retry-After": str(max(1, math.ceil(int(wait_ms) / 1000)))})


@web.middleware
async def ratelimit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """After authentication: the request's account is known."""
    limiter = request.app.get(RATE_LIMITER)
    account_id = request.get(ACCOUNT_ID)
    if limiter is not None and account_id is not None:
        try:
            await limiter.check(account_id)
        except RedisError as exc:
            # Limits protect the service; an outage of Redis is answered by the request's own
            # use of it, and a read that does not need Redis still works.
            metrics.DEPENDENCY_ERRORS.labels("redis").inc()
            log.warning("could not check the rate limit", extra={"ids": {"error": repr(exc)}})
    return await handler(request)
