"""String enums mirrored by the Postgres enums and CHECKs in ops/migrations."""

from __future__ import annotations

from enum import StrEnum


class IntentStatus(StrEnum):
    REQUIRES_PAYMENT_METHOD = "requires_payment_method"
    REQUIRES_CONFIRMATION = "requires_confirmation"
    REQUIRES_ACTION = "requires_action"
    PROCESSING = "processing"
    REQUIRES_CAPTURE = "requires_capture"
    SUCCEEDED = "succeeded"
    CANCELED = "canceled"


class ChargeStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class EventType(StrEnum):
    INTENT_CREATED = "payment_intent.created"
    INTENT_PROCESSING = "payment_intent.processing"
    INTENT_SUCCEEDED = "payment_intent.succeeded"
    INTENT_PAYMENT_FAILED = "payment_intent.payment_failed"
    INTENT_AMOUNT_CAPTURABLE_UPDATED = "payment_intent.amount_capturable_updated"
    INTENT_CANCELED = "payment_intent.canceled"
    CHARGE_SUCCEEDED = "charge.succeeded"
    CHARGE_FAILED = "charge.failed"
    CHARGE_CAPTURED = "charge.captured"
    CHARGE_REFUNDED = "charge.refunded"
    CHARGE_REFUND_UPDATED = "charge.refund.updated"
    REFUND_CREATED = "refund.created"
    REFUND_UPDATED = "refund.updated"
    REFUND_FAILED = "refund.failed"
    WEBHOOK_ENDPOINT_DISABLED = "webhook_endpoint.disabled"


class CaptureMethod(StrEnum):
    AUTOMATIC = "automatic"
    # Stripe's asynchronous variant of automatic capture; here the same as automatic.
    AUTOMATIC_ASYNC = "automatic_async"
    MANUAL = "manual"


class CancellationReason(StrEnum):
    """What a client may give; AUTOMATIC is the system's, for an authorization that expired."""

    ABANDONED = "abandoned"
    DUPLICATE = "duplicate"
    FRAUDULENT = "fraudulent"
    REQUESTED_BY_CUSTOMER = "requested_by_customer"
    AUTOMATIC = "automatic"


class TaskKind(StrEnum):
    """PSP work on an authorization that exists (processor/psp_tasks.py)."""

    CAPTURE = "capture"
    VOID = "void"
    REVERSE = "reverse"


class RefundStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class RefundReason(StrEnum):
    DUPLICATE = "duplicate"
    FRAUDULENT = "fraudulent"
    REQUESTED_BY_CUSTOMER = "requested_by_customer"
