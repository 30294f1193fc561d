"""Which events a webhook endpoint receives."""

from __future__ import annotations

from collections.abc import Iterable

from contracts.enums import EventType

# What `enabled_events` may name: every event type payonce emits, or "*" for all of them.
SUBSCRIBABLE = frozenset(EventType)
ALL_EVENTS = "*"


def unknown_types(enabled_events: Iterable[str]) -> list[str]:
    """The entries of `enabled_events` that name no event payonce emits."""
    return [t for t in enabled_events if t != ALL_EVENTS and t not in SUBSCRIBABLE]


def receives(enabled_events: Iterable[str], event_type: str) -> bool:
    return any(t == ALL_EVENTS or t == event_type for t in enabled_events)
