"""Webhook signatures: Stripe's and Standard Webhooks', both on every attempt.

One endpoint secret (`whsec_` + base64 of 32 bytes, contracts/ids.webhook_secret) serves both
schemes:

- Stripe: `Stripe-Signature: t=<unix>,v1=<hex>`, the HMAC-SHA256 of `"{t}.{body}"` keyed with
  the whole `whsec_…` string, as `stripe.Webhook.construct_event` checks it;
- Standard Webhooks: `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64>`,
  the HMAC-SHA256 of `"{id}.{timestamp}.{body}"` keyed with the bytes base64-decoded after
  `whsec_`, as the `standardwebhooks` package checks it.

Both verifiers refuse timestamps more than five minutes old, so every attempt is signed afresh;
the id stays the same on every retry, so a receiver can drop a duplicate.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

SECRET_PREFIX = "whsec_"


def stripe_signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Stripe-Signature` header's value."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def standard_signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1,{base64.b64encode(digest.digest()).decode()}"


def signature_headers(
    secret: str, message_id: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """Every signature header of one attempt, signed at `timestamp` (default: now)."""
    t = int(time.time()) if timestamp is None else timestamp
    return {
        "Stripe-Signature": stripe_signature(secret, t, body),
        "webhook-id": message_id,
        "webhook-timestamp": str(t),
        "webhook-signature": standard_signature(secret, message_id, t, body),
    }
