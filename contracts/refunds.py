"""A refund's states as one table, and the outcomes of a refund request that are not errors.

A refund is `pending` from its creation until the PSP answers; `succeeded` can still turn
`failed` (the PSP could not return the money after all, and gives it back to the merchant);
`failed` is final. The processor consults the table before it applies a PSP answer.
"""

from __future__ import annotations

from collections.abc import Mapping

from contracts.enums import RefundStatus as R
from contracts.errors import UnexpectedState

TRANSITIONS: Mapping[R, frozenset[R]] = {
    R.PENDING: frozenset({R.SUCCEEDED, R.FAILED}),
    R.SUCCEEDED: frozenset({R.FAILED}),
    R.FAILED: frozenset(),
}

# A refund accepted while another one of the same charge was not applied yet, and that would
# take the refunds beyond what was captured: it fails, and no money moves.
EXCEEDS_CAPTURED = "insufficient_refundable_amount"
# The PSP refused the refund itself.
DECLINED = "declined"


def allowed(current: R, new: R) -> bool:
    return new in TRANSITIONS[current]


def not_refundable(intent_id: str, status: str) -> UnexpectedState:
    """A refund of an intent without a successful charge, from the edge or the processor."""
    return UnexpectedState(
        f"This PaymentIntent ({intent_id}) does not have a successful charge to refund: it has "
        f"a status of {status}.", param="payment_intent")
