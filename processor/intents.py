"""What every command applied to a PaymentIntent shares: its outcome (`Applied`), the rows
of the events it writes (derived from the object, the type and the command, so a command
applied again writes the same events), and where a PSP result takes its intent.

Commands are applied in batches (processor/batches.py); one applied alone, redelivered or
isolated after its batch failed, is a batch of one (`batches.Intents`), so every command is
written once and each takes effect exactly once, in one transaction with its inbox row and its
events, however often it is delivered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from contracts import ids, objects
from contracts.commands import ApplyPSPResult, ClientCommand, Command
from contracts.enums import EventType, IntentStatus
from contracts.errors import UnexpectedState
from contracts.transitions import Action, next_status

log = logging.getLogger(__name__)

FORGET_START = "DELETE FROM command_starts WHERE queue = $1 AND message_id = $2"
# The notification wakes the outbox relay; Postgres delivers it at commit, once per
# transaction however many events it holds.
INSERT_EVENT = """
WITH inserted AS (
    INSERT INTO events (id, account_id, type, object_id, data, previous_attributes, request_id,
                        idempotency_key, exchange)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
    ON CONFLICT (id) DO NOTHING
)
SELECT pg_notify('payonce_events', '')
"""


# Different partitions never hold the same intent (partition = hash of its id), so
# concurrent batches never wait on each other's locks.
LOCK_INTENTS = "SELECT * FROM payment_intents WHERE id = ANY($1::text[]) FOR UPDATE"


class Rows:
    """Rows for one multi-row statement, gathered column by column."""

    def __init__(self, width: int) -> None:
        self.columns: list[list[Any]] = [[] for _ in range(width)]

    def add(self, *values: Any) -> None:
        for column, value in zip(self.columns, values, strict=True):
            column.append(value)

    def __bool__(self) -> bool:
        return bool(self.columns[0])


@dataclass(slots=True)
class Applied:
    """What applying a command did, for the consumer to log, count and follow up on."""

    outcome: str  # applied, duplicate, rejected
    # PSP work it started: payment attempts, as the rows it made claimed for this processor's
    # runner (processor/batches.py, INSERT_ATTEMPTS), and refunds, by id.
    attempts: list[Any] = field(default_factory=list)
    refunds: list[str] = field(default_factory=list)
    # PSP tasks it asked for (processor/psp_tasks.py).
    tasks: list[str] = field(default_factory=list)
    detail: str = ""


def missing_payment_method() -> UnexpectedState:
    return UnexpectedState("You cannot confirm this PaymentIntent because it's missing a "
                           "payment method.", param="payment_method")


def psp_transition(result: ApplyPSPResult, row: Any) -> IntentStatus | None:
    """Where a PSP result takes its intent (a canceled one stays canceled), or None when the
    intent is in no state a result can find it in (logged)."""
    if not result.succeeded:
        action = Action.PSP_DECLINED
    else:
        action = Action.PSP_SUCCEEDED if result.captured else Action.PSP_AUTHORIZED
    try:
        return next_status(action, IntentStatus(row["status"]))
    except UnexpectedState:
        log.error("psp result for an intent not processing",
                  extra={"ids": {"intent": row["id"], "status": row["status"]}})
        return None


def outcome_events(succeeded: bool) -> tuple[EventType, EventType]:
    """(the charge's event, the intent's event) of a PSP result."""
    if succeeded:
        return EventType.CHARGE_SUCCEEDED, EventType.INTENT_SUCCEEDED
    return EventType.CHARGE_FAILED, EventType.INTENT_PAYMENT_FAILED


def event_values(
    secret: bytes, exchange: str, command: Command, event_type: EventType, row: Any, *,
    previous: dict[str, Any] | None = None, rendered: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """The columns of an events row (INSERT_EVENT's parameters), its id derived from the
    object, the type and the command, so a command applied again writes the same event."""
    obj = rendered or objects.payment_intent(row, secret)
    event_id = ids.event_id(secret, obj["id"], event_type, command.message_id)
    key = command.idempotency_key if isinstance(command, ClientCommand) else None
    return (event_id, command.account_id, event_type.value, obj["id"], obj, previous,
            command.request_id, key, exchange)
