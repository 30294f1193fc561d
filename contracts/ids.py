"""Object ids.

Ids of objects a client creates are derived from (account, Idempotency-Key) with the server
secret, so a retry after any loss (Redis flushed, edge killed after publishing) lands on the
same object. The client_secret is derived from the intent id, so it is never stored and can be
checked by recomputing it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string

_ALPHABET = string.digits + string.ascii_letters
ID_LENGTH = 24


def _base62(data: bytes, length: int) -> str:
    number = int.from_bytes(data, "big")
    chars = []
    for _ in range(length):
        number, digit = divmod(number, 62)
        chars.append(_ALPHABET[digit])
    return "".join(chars)


def derive(secret: bytes, prefix: str, *parts: str, length: int = ID_LENGTH) -> str:
    message = "\x1f".join((prefix, *parts)).encode()
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return f"{prefix}_{_base62(digest, length)}"


def random_id(prefix: str, length: int = ID_LENGTH) -> str:
    return f"{prefix}_{''.join(secrets.choice(_ALPHABET) for _ in range(length))}"


def intent_id(secret: bytes, account_id: str, idempotency_key: str) -> str:
    return derive(secret, "pi", account_id, idempotency_key)


def attempt_id(secret: bytes, intent_id: str, idempotency_key: str) -> str:
    """One PSP attempt per accepted confirm; a redelivered confirm maps to the same attempt."""
    return derive(secret, "pa", intent_id, idempotency_key)


def charge_id(secret: bytes, attempt_id: str) -> str:
    return derive(secret, "ch", attempt_id)


def event_id(secret: bytes, object_id: str, event_type: str, cause: str) -> str:
    return derive(secret, "evt", object_id, event_type, cause)


def refund_id(secret: bytes, account_id: str, idempotency_key: str) -> str:
    return derive(secret, "re", account_id, idempotency_key)


def webhook_endpoint_id(secret: bytes, account_id: str, idempotency_key: str) -> str:
    return derive(secret, "we", account_id, idempotency_key)


def webhook_delivery_id(secret: bytes, endpoint_id: str, event_id: str) -> str:
    return derive(secret, "whd", endpoint_id, event_id)


def webhook_secret(secret: bytes, endpoint_id: str) -> str:
    """`whsec_` and the base64 of 32 bytes: Stripe's scheme signs with the whole string, and
    Standard Webhooks with the bytes decoded after the prefix; both accept it."""
    key = hmac.new(secret, f"whsec\x1f{endpoint_id}".encode(), hashlib.sha256).digest()
    return f"whsec_{base64.b64encode(key).decode()}"


def client_secret(secret: bytes, intent_id: str) -> str:
    tail = derive(secret, "secret", intent_id, length=25).removeprefix("secret_")
    return f"{intent_id}_secret_{tail}"


def client_secret_matches(secret: bytes, candidate: str) -> bool:
    intent, sep, _ = candidate.partition("_secret_")
    return bool(sep) and hmac.compare_digest(client_secret(secret, intent), candidate)


def task_id(secret: bytes, cause: str, kind: str) -> str:
    """One PSP task of a kind per cause (the message id of the command that asks for it), so a
    command applied again asks for the same task."""
    return derive(secret, "pt", cause, kind)
