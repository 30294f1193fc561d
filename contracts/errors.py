"""Stripe-shaped errors.

Every error a client can cause is one of these; the edge's error middleware turns them into
`{"error": {"type", "code", "message", "param"}}` with the status code here. As in Stripe's
answers, `code`, `param` and `decline_code` are left out where there is none: Stripe's schema
types them as strings, not nullable ones, and its libraries read a missing key as None.
"""

from __future__ import annotations

from typing import Any, ClassVar


class PayonceError(Exception):
    """Base of every error that is answered to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "api_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.decline_code = decline_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error = {
            "type": self.type,
            "code": self.code,
            "decline_code": self.decline_code,
            "message": self.message,
            "param": self.param,
        }
        return {"error": {k: v for k, v in error.items() if v is not None}}


class InvalidRequest(PayonceError):
    """A request the API cannot accept as sent (400)."""

    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class ParameterUnknown(InvalidRequest):
    """A parameter the endpoint does not take."""

    default_code = "parameter_unknown"


class ParameterMissing(InvalidRequest):
    """A required parameter or header is absent."""

    default_code = "parameter_missing"


class ParameterInvalid(InvalidRequest):
    """A parameter of the wrong type, size or value."""

    default_code = "parameter_invalid"


class UnexpectedState(InvalidRequest):
    """The transition table forbids the action in the object's current status."""

    default_code = "payment_intent_unexpected_state"


class IdempotencyMismatch(PayonceError):
    """An Idempotency-Key reused with different parameters (400)."""

    status = 400
    type = "idempotency_error"
    default_code = "idempotency_key_reused"


class IdempotencyKeyInUse(PayonceError):
    """The same Idempotency-Key is still being executed; safe to retry (409)."""

    status = 409
    type = "idempotency_error"
    default_code = "idempotency_key_in_use"


class AuthenticationFailed(PayonceError):
    """No API key, or one that matches no account (401)."""

    status = 401
    type = "invalid_request_error"
    default_code = "api_key_invalid"


class ResourceMissing(PayonceError):
    """No such object for this account (404)."""

    status = 404
    type = "invalid_request_error"
    default_code = "resource_missing"


class MethodNotAllowed(PayonceError):
    """The path exists but not for this HTTP method (405)."""

    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(PayonceError):
    """The request body is over the limit (413)."""

    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class TooEarly(PayonceError):
    """The object was accepted but its command is not applied yet (425); retry shortly."""

    status = 425
    type = "invalid_request_error"
    default_code = "resource_not_ready"


class RateLimited(PayonceError):
    """More requests than the account's rate limit, or than the edge's long-polls, allow (429);
    back off and retry after `Retry-After`."""

    status = 429
    type = "invalid_request_error"
    default_code = "rate_limit"


class ServiceUnavailable(PayonceError):
    """A dependency is down; nothing was accepted and the request is safe to retry (503)."""

    status = 503
    type = "api_error"
    default_code = "service_unavailable"


class OutcomeUnknown(ServiceUnavailable):
    """A command was not confirmed but may have been queued: retry with the same key (503)."""

    default_code = "outcome_unknown"


def capture_too_large(amount: int, capturable: int) -> InvalidRequest:
    """A capture of more than the authorization holds."""
    return InvalidRequest(
        f"The amount to capture ({amount}) must be less than or equal to the PaymentIntent's "
        f"amount_capturable ({capturable}).", code="amount_too_large", param="amount_to_capture")
