"""Waiting for a payment's outcome in the POST that starts it, as Stripe's API answers.

Every command is answered 202 once it is queued. A client that would rather have the outcome
in the same answer says so with `Prefer: wait=N` (RFC 7240; N seconds, at most MAX_WAIT_S and
within the request's own deadline). A create with `confirm=true`, a confirm and a capture then
wait, once accepted, until nothing is under way for the intent any more:

- it reached a resting status (`succeeded`, `requires_capture`, `canceled`, …): 200 with the
  PaymentIntent;
- its payment was declined (back to `requires_payment_method` with a `last_payment_error`):
  402 `card_error` with the decline's `code`, `decline_code`, `message` and `charge`, and the
  PaymentIntent, which Stripe's libraries raise as CardError;
- still under way when the wait is over: the 202, as without the preference.

The answer is the one the Idempotency-Key keeps: a retry with the same key gets it again. The
wait is a long-poll's (edge/waiters.py), woken by the intent's status events, never polling.
A malformed or unknown preference is ignored, as RFC 7240 asks. A request that cannot wait
(too many waiters on this edge, or Redis gone) answers its 202: the command is queued either
way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from contracts.enums import IntentStatus
from contracts.errors import PayonceError
from edge.accept import Outcome
from edge.keys import ACCOUNT_ID, DEADLINE, WAITERS
from edge.waiters import CLIENT_CHECK_S, MAX_WAIT_S, Reading, client_gone

log = logging.getLogger(__name__)

# Left of the request's deadline after the wait, to store the answer for the key.
FINISH_MARGIN_S = 1.0


def preferred_wait(request: web.Request) -> int:
    """The seconds a `Prefer: wait=N` header asks for, bounded; 0 without one."""
    for header in request.headers.getall("Prefer", []):
        for preference in header.split(","):
            name, _, value = preference.split(";")[0].strip().partition("=")
            if name.strip().lower() == "wait":
                value = value.strip().strip('"')
                if value.isdigit():
                    return min(int(value), MAX_WAIT_S)
    return 0


async def waited(request: web.Request, intent_id: str, accepted: Outcome,
                 read: Callable[[], Awaitable[Reading]]) -> Outcome:
    """The answer to a POST that started or finished a payment: `accepted` (its 202), or the
    outcome it was told to wait for, when it came in time; `read` reads the intent as a GET
    does (edge/intents.py `read_intent`)."""
    wait_s = preferred_wait(request)
    if not wait_s or accepted.status != 202:
        return accepted
    clock = asyncio.get_running_loop()
    deadline = min(clock.time() + wait_s, request[DEADLINE] - FINISH_MARGIN_S)
    reading = None
    try:
        async with request.app[WAITERS].watch(request[ACCOUNT_ID], intent_id) as watch:
            await watch.ready()
            while True:
                reading = await read()
                remaining = deadline - clock.time()
                if not reading.under_way or remaining <= 0 or client_gone(request):
                    break
                await watch.wait(min(remaining, CLIENT_CHECK_S))
    except (PayonceError, RedisError) as exc:
        # The command is queued: its 202 stands.
        log.info("could not wait for the outcome", extra={"ids": {"error": repr(exc)}})
        return accepted
    if reading is None or reading.under_way or isinstance(reading.answer, PayonceError):
        return accepted
    intent = reading.answer
    headers = {"Preference-Applied": f"wait={wait_s}"}
    declined = intent.get("last_payment_error")
    if intent["status"] == IntentStatus.REQUIRES_PAYMENT_METHOD and declined:
        return Outcome(402, orjson.dumps({"error": card_error(declined, intent)}), headers)
    return Outcome(200, orjson.dumps(intent), headers)


def card_error(declined: dict[str, Any], intent: dict[str, Any]) -> dict[str, Any]:
    """Stripe's error for a declined payment: the decline, with the PaymentIntent."""
    return {**declined, "payment_intent": intent}
