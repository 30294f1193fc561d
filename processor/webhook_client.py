"""The dispatcher's HTTP client: one POST per attempt, to public addresses only.

Every attempt goes through one aiohttp session with a keep-alive connection pool. Unless
`webhook_allow_private` is on, the connector refuses every address contracts/webhook_urls
forbids, twice: the resolver drops such addresses from what a host resolves to, and the socket
factory refuses to open a socket to one, which also covers IP literals (aiohttp does not
resolve those) and is the address actually connected to, so a name that resolves elsewhere
after the endpoint was checked (DNS rebinding) cannot reach an internal host. Redirects are
never followed (a 3xx is a failed attempt) and no proxy is taken from the environment.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from contracts.webhook_urls import forbidden
from ops.settings import Settings

# A receiver's answer is not used; reading a little of it lets the connection be reused, and
# a bigger body just closes the connection instead of being read.
MAX_RESPONSE_BYTES = 64 * 1024
# Idle keep-alive connections to a receiver are kept this long: longer than the pauses of a
# busy endpoint's traffic, shorter than most servers' own idle limits.
KEEPALIVE_S = 30.0
MAX_ERROR_CHARS = 1000
FORBIDDEN = "forbidden address"


class ForbiddenAddress(OSError):
    """An address payonce does not connect to (private, loopback, …); the attempt fails."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt got: a status code, or an error (timeout, refused, forbidden, …)."""

    result: str  # succeeded, http_error, redirect, timeout, refused, forbidden, connection_error
    latency_s: float
    status_code: int | None = None
    error: str | None = None
    retry_after_s: float | None = None

    @property
    def succeeded(self) -> bool:
        return self.result == "succeeded"


class GuardedResolver(AbstractResolver):
    """The default resolver, less the addresses payonce does not connect to."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if forbidden(r["host"]) is None]
        if not allowed:
            first = results[0]["host"] if results else "?"
            raise ForbiddenAddress(f"{FORBIDDEN}: {host[:100]} resolves to {first}, "
                                   f"{forbidden(first) if results else 'nothing'}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def guarded_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """The socket factory of the connector: no socket to a forbidden address."""
    family, type_, proto, _, address = addr_info
    reason = forbidden(str(address[0]))
    if reason is not None:
        raise ForbiddenAddress(f"{FORBIDDEN}: {address[0]} is {reason}")
    return socket.socket(family=family, type=type_, proto=proto)


def retry_after(value: str | None) -> float | None:
    """Seconds asked for by a `Retry-After` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class WebhookClient:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        s = self._settings
        guard = not s.webhook_allow_private
        connector = aiohttp.TCPConnector(
            limit=s.webhook_concurrency, keepalive_timeout=KEEPALIVE_S,
            resolver=GuardedResolver() if guard else None,
            socket_factory=guarded_socket if guard else None)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=s.webhook_timeout_s),
            # Only the headers an attempt names (and Host, Content-Length) are sent.
            skip_auto_headers=("Accept", "Accept-Encoding"), auto_decompress=False,
            trust_env=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        """One attempt; never raises but for cancellation."""
        assert self._session is not None
        started = time.monotonic()

        def outcome(result: str, **kw: Any) -> Outcome:
            return Outcome(result, time.monotonic() - started, **kw)

        try:
            async with self._session.post(url, data=body, headers=headers,
                                          allow_redirects=False) as resp:
                await resp.content.read(MAX_RESPONSE_BYTES)
                status = resp.status
                wait = retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            return outcome("timeout", error=f"timeout: no answer within "
                                            f"{self._settings.webhook_timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            text = _error_text(exc.os_error)
            if isinstance(exc.os_error, ForbiddenAddress) or FORBIDDEN in text:
                return outcome("forbidden", error=text)
            if isinstance(exc.os_error, ConnectionRefusedError):
                return outcome("refused", error=f"connection refused: {text}")
            return outcome("connection_error", error=f"cannot connect: {text}")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # A dropped connection, a malformed answer, a URL aiohttp cannot use.
            return outcome("connection_error", error=_error_text(exc))
        if not 100 <= status <= 599:
            return outcome("http_error", error=f"invalid status code {status}")
        if 200 <= status < 300:
            return outcome("succeeded", status_code=status)
        if 300 <= status < 400:
            return outcome("redirect", status_code=status, retry_after_s=wait,
                           error="redirects are not followed")
        return outcome("http_error", status_code=status, retry_after_s=wait)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:MAX_ERROR_CHARS]
