"""Accounts and their API keys. Keys are returned once, at creation, and stored as digests."""

from __future__ import annotations

import hashlib
import secrets
import string
from typing import Any

from contracts import ids

_KEY_ALPHABET = string.ascii_letters + string.digits

INSERT_ACCOUNT = "INSERT INTO accounts (id, name) VALUES ($1, $2)"
INSERT_KEY = """
INSERT INTO api_keys (key_hash, account_id, kind, last4) VALUES ($1, $2, $3, $4)
"""
FIND_KEY = """
SELECT k.account_id, k.kind FROM api_keys k WHERE k.key_hash = $1
"""


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _new_key(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(40))


async def create_account(conn: Any, name: str) -> dict[str, str]:
    account_id = ids.random_id("acct", 24)
    secret_key = _new_key("sk_test_")
    publishable_key = _new_key("pk_test_")
    async with conn.transaction():
        await conn.execute(INSERT_ACCOUNT, account_id, name)
        for key, kind in ((secret_key, "secret"), (publishable_key, "publishable")):
            await conn.execute(INSERT_KEY, key_hash(key), account_id, kind, key[-4:])
    return {"account": account_id, "secret_key": secret_key, "publishable_key": publishable_key}


async def find_key(conn: Any, key: str) -> tuple[str, str] | None:
    """(account id, kind) of an API key, or None."""
    row = await conn.fetchrow(FIND_KEY, key_hash(key))
    return (row["account_id"], row["kind"]) if row else None
