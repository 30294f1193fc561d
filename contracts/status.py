"""The status fan-out's Redis channels: one per PaymentIntent, on which the processor
publishes a small notification whenever an event of the intent (or of its charges) leaves the
outbox (processor/status.py) and whenever it clears a pending marker (contracts/pending.py),
and the edge's long-polls listen (edge/waiters.py).

A notification only says "look again": it carries the event's id and type, never the state,
so a waiter always answers what Postgres holds. Redis pub/sub channels are shared by every
database of a server, hence the deployment in the name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def channel(deployment: str, account_id: str, intent_id: str) -> str:
    return f"status:{deployment}:{account_id}:{intent_id}"


def intent_of(event: Mapping[str, Any]) -> str | None:
    """The PaymentIntent an event (as contracts/objects.event renders it) is about, if any:
    the intent itself, or the intent of the charge (or any object) that names one."""
    obj = event.get("data", {}).get("object")
    if not isinstance(obj, Mapping):
        return None
    if obj.get("object") == "payment_intent":
        found = obj.get("id")
    else:
        found = obj.get("payment_intent")
    return found if isinstance(found, str) else None
