"""The PaymentIntent state machine as one table.

The edge consults it to refuse impossible requests early; the processor enforces it when it
applies a command, since the state the edge saw may be stale by then.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from contracts.enums import IntentStatus as S
from contracts.errors import UnexpectedState


class Action(StrEnum):
    CONFIRM = "confirm"
    PSP_SUCCEEDED = "psp_succeeded"
    PSP_DECLINED = "psp_declined"
    CANCEL = "cancel"


TRANSITIONS: Mapping[Action, Mapping[S, S]] = {
    Action.CONFIRM: {
        S.REQUIRES_PAYMENT_METHOD: S.PROCESSING,
        S.REQUIRES_CONFIRMATION: S.PROCESSING,
    },
    Action.PSP_SUCCEEDED: {S.PROCESSING: S.SUCCEEDED},
    Action.PSP_DECLINED: {S.PROCESSING: S.REQUIRES_PAYMENT_METHOD},
    Action.CANCEL: {
        S.REQUIRES_PAYMENT_METHOD: S.CANCELED,
        S.REQUIRES_CONFIRMATION: S.CANCELED,
        S.REQUIRES_ACTION: S.CANCELED,
        S.PROCESSING: S.CANCELED,
        S.REQUIRES_CAPTURE: S.CANCELED,
    },
}

TERMINAL = frozenset({S.SUCCEEDED, S.CANCELED})


def next_status(action: Action, status: S) -> S:
    """The status `action` leads to from `status`, or UnexpectedState."""
    try:
        return TRANSITIONS[action][status]
    except KeyError:
        raise UnexpectedState(
            f"You cannot {action.value.replace('_', ' ')} this PaymentIntent because it has "
            f"a status of {status.value}.",
        ) from None
