"""API key authentication: `Authorization: Bearer sk_…`, or HTTP Basic with the key as the
user name (as Stripe accepts). Keys are looked up by their SHA-256 digest.

A publishable key (`pk_…`) opens one route, as at Stripe: retrieving a PaymentIntent, with
its `client_secret` in the query string (edge/intents.py checks the secret and answers the
fields Stripe shows a publishable key). Every other route refuses it with Stripe's 401."""

from __future__ import annotations

import base64
import time
from typing import Any

from contracts.errors import AuthenticationFailed
from ops import accounts

# A key's account is cached this long; a revoked key keeps working at most this long.
CACHE_TTL_S = 30.0
CACHE_MAX = 10_000

SECRET = "secret"
PUBLISHABLE = "publishable"
# (method, route) pairs a publishable key may call.
PUBLISHABLE_ROUTES = frozenset({("GET", "/v1/payment_intents/{id}")})


def key_from_header(header: str | None) -> str:
    if not header:
        raise AuthenticationFailed(
            "You did not provide an API key. Provide it in the Authorization header as "
            "'Bearer YOUR_SECRET_KEY'.", code="api_key_missing")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    # Keys are ASCII; a header with other bytes (undecodable ones arrive as surrogates) is no key.
    if scheme.lower() == "bearer" and value and value.isascii():
        return value
    if scheme.lower() == "basic" and value:
        try:
            user = base64.b64decode(value, validate=True).decode().partition(":")[0]
        except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8
            user = ""
        if user and user.isascii():
            return user
    raise AuthenticationFailed("Invalid Authorization header: use 'Bearer YOUR_SECRET_KEY'.")


def _redacted(key: str) -> str:
    return f"{key[:8]}***{key[-4:]}" if len(key) > 12 else "***"


class KeyCache:
    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[float, str, str]] = {}

    async def account_for(self, db: Any, key: str, *, publishable_ok: bool = False
                          ) -> tuple[str, str]:
        """(account id, the key's kind: SECRET or PUBLISHABLE); a publishable key only where
        the route takes one."""
        digest = accounts.key_hash(key)
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is None or entry[0] < now:
            found = await accounts.find_key(db, key)
            if found is None:
                raise AuthenticationFailed(f"Invalid API Key provided: {_redacted(key)}")
            if len(self._entries) >= CACHE_MAX:
                self._entries.clear()
            entry = (now + CACHE_TTL_S, *found)
            self._entries[digest] = entry
        _, account_id, kind = entry
        if kind != SECRET and not (kind == PUBLISHABLE and publishable_ok):
            raise AuthenticationFailed("This API call cannot be made with a publishable API key. "
                                       "Use a secret API key.", code="secret_key_required")
        return account_id, kind
