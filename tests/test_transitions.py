"""The transition table, without services: every allowed transition, and every forbidden one
refused with Stripe's code, the status the client sees and the parameter at fault."""

from __future__ import annotations

import pytest

from contracts.enums import IntentStatus as S
from contracts.errors import UnexpectedState
from contracts.transitions import CAPTURING, TRANSITIONS, Action, next_status, shown, state

STATES = [*S, CAPTURING]


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("from_", STATES)
def test_every_transition_and_every_refusal(action: Action, from_: str) -> None:
    allowed = TRANSITIONS[action]
    if from_ in allowed:
        assert next_status(action, from_) is allowed[from_]
        return
    with pytest.raises(UnexpectedState) as raised:
        next_status(action, from_, param="amount" if action is Action.UPDATE else None)
    error = raised.value.body()["error"]
    assert error["code"] == "payment_intent_unexpected_state"
    assert f"status of {shown(from_)}." in error["message"]
    assert error.get("param") == ("amount" if action is Action.UPDATE else None)


def test_lifecycle_paths() -> None:
    assert next_status(Action.CAPTURE, S.REQUIRES_CAPTURE) is S.PROCESSING
    assert next_status(Action.CAPTURED, CAPTURING) is S.SUCCEEDED
    assert next_status(Action.CAPTURE_FAILED, CAPTURING) is S.REQUIRES_CAPTURE
    assert next_status(Action.ATTACH, S.REQUIRES_PAYMENT_METHOD) is S.REQUIRES_CONFIRMATION
    for status in (S.SUCCEEDED, S.CANCELED, CAPTURING):
        assert next_status(Action.ANNOTATE, status) == status
    # Canceled from every status Stripe allows, never while a capture is under way.
    assert set(TRANSITIONS[Action.CANCEL]) == {
        S.REQUIRES_PAYMENT_METHOD, S.REQUIRES_CONFIRMATION, S.REQUIRES_ACTION, S.PROCESSING,
        S.REQUIRES_CAPTURE}
    with pytest.raises(UnexpectedState, match="A capture of it is under way"):
        next_status(Action.CANCEL, CAPTURING)


def test_a_capture_under_way_is_told_apart_by_what_is_capturable() -> None:
    assert state({"status": "processing", "amount_capturable": 0}) is S.PROCESSING
    assert state({"status": "processing", "amount_capturable": 500}) == CAPTURING
    assert state({"status": "requires_capture", "amount_capturable": 500}) is \
        S.REQUIRES_CAPTURE
    assert shown(CAPTURING) == "processing"
