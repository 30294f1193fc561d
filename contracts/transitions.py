"""The PaymentIntent state machine as one table.

The edge consults it to refuse impossible requests early; the processor enforces it when it
applies a command, since the state the edge saw may be stale by then.

A state is an intent's status, except that a capture under way is its own state, CAPTURING,
shown to clients as `processing`: an intent processing its authorization may be canceled (the
authorization is voided when it comes back), one processing its capture may not (the money is
being moved). The two are told apart by `amount_capturable`, positive only while an
authorization is held (`state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from contracts.enums import IntentStatus as S
from contracts.errors import UnexpectedState

CAPTURING = "capturing"


class Action(StrEnum):
    CONFIRM = "confirm"
    # The PSP's answer to an attempt: authorized and captured (automatic capture), authorized
    # only (manual capture), or declined.
    PSP_SUCCEEDED = "psp_succeeded"
    PSP_AUTHORIZED = "psp_authorized"
    PSP_DECLINED = "psp_declined"
    CANCEL = "cancel"
    CAPTURE = "capture"
    # The PSP's answer to a capture.
    CAPTURED = "captured"
    CAPTURE_FAILED = "capture_failed"
    # Amount, currency, customer, capture_method: what a confirmation would charge.
    UPDATE = "update"
    # A payment method given by an update.
    ATTACH = "attach"
    # Metadata and description: any time, as at Stripe.
    ANNOTATE = "annotate"


_BEFORE_CONFIRMATION = (S.REQUIRES_PAYMENT_METHOD, S.REQUIRES_CONFIRMATION, S.REQUIRES_ACTION)

TRANSITIONS: Mapping[Action, Mapping[str, S]] = {
    Action.CONFIRM: {
        S.REQUIRES_PAYMENT_METHOD: S.PROCESSING,
        S.REQUIRES_CONFIRMATION: S.PROCESSING,
        S.REQUIRES_ACTION: S.PROCESSING,
    },
    # A result that finds its intent canceled (a cancel accepted while it was processing)
    # leaves it canceled; the authorization it brings is voided, or reversed if captured.
    Action.PSP_SUCCEEDED: {S.PROCESSING: S.SUCCEEDED, S.CANCELED: S.CANCELED},
    Action.PSP_AUTHORIZED: {S.PROCESSING: S.REQUIRES_CAPTURE, S.CANCELED: S.CANCELED},
    Action.PSP_DECLINED: {S.PROCESSING: S.REQUIRES_PAYMENT_METHOD, S.CANCELED: S.CANCELED},
    # In Stripe's order, which its error message lists.
    Action.CANCEL: {
        S.REQUIRES_PAYMENT_METHOD: S.CANCELED,
        S.REQUIRES_CAPTURE: S.CANCELED,
        S.REQUIRES_CONFIRMATION: S.CANCELED,
        S.REQUIRES_ACTION: S.CANCELED,
        S.PROCESSING: S.CANCELED,
    },
    Action.CAPTURE: {S.REQUIRES_CAPTURE: S.PROCESSING},
    Action.CAPTURED: {CAPTURING: S.SUCCEEDED},
    Action.CAPTURE_FAILED: {CAPTURING: S.REQUIRES_CAPTURE},
    Action.UPDATE: {s: s for s in _BEFORE_CONFIRMATION},
    Action.ATTACH: {s: S.REQUIRES_CONFIRMATION for s in _BEFORE_CONFIRMATION},
    Action.ANNOTATE: {s: s for s in (*S, CAPTURING)},
}

TERMINAL = frozenset({S.SUCCEEDED, S.CANCELED})


def state(intent: Mapping[str, Any]) -> str:
    """The state of an intent (a row or its rendered object) in the table's terms."""
    status = S(intent["status"])
    if status is S.PROCESSING and (intent.get("amount_capturable") or 0) > 0:
        return CAPTURING
    return status


def shown(state_: str) -> str:
    """The status a client sees for a state."""
    return S.PROCESSING.value if state_ == CAPTURING else str(state_)


def _refusal(action: Action, state_: str, param: str | None) -> UnexpectedState:
    status = shown(state_)
    allowed = ", ".join(shown(s) for s in TRANSITIONS.get(action, {}))
    if action is Action.CAPTURE:
        message = (f"This PaymentIntent could not be captured because it has a status of "
                   f"{status}. Only a PaymentIntent with one of the following statuses may be "
                   f"captured: {allowed}.")
    elif action in (Action.UPDATE, Action.ATTACH):
        what = param or "amount"
        message = (f"This PaymentIntent's {what} could not be updated because it has a status "
                   f"of {status}. You may only update the {what} of a PaymentIntent with one "
                   f"of the following statuses: {allowed}.")
    else:
        verb = action.value.replace("_", " ")
        past = {Action.CONFIRM: "confirmed", Action.CANCEL: "canceled"}.get(action, verb)
        message = f"You cannot {verb} this PaymentIntent because it has a status of {status}."
        if state_ == CAPTURING:
            message += " A capture of it is under way."
        else:
            message += (f" Only a PaymentIntent with one of the following statuses may be "
                        f"{past}: {allowed}.")
    return UnexpectedState(message, param=param)


def next_status(action: Action, state_: str, *, param: str | None = None) -> S:
    """The status `action` leads to from `state_` (a status, or CAPTURING), or UnexpectedState
    naming `param` when a parameter is what the status forbids."""
    try:
        return TRANSITIONS[action][state_]
    except KeyError:
        raise _refusal(action, state_, param) from None
