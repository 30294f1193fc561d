"""Which URLs payonce delivers webhooks to.

A merchant names the URL; payonce connects to it from inside its own network. So a URL must
be http(s) with a host, and by default every address the host resolves to must be a public
one: not private, loopback, link-local, multicast, reserved or unspecified. The check runs
when an endpoint is created or changed (the edge) and again at every delivery on the address
actually connected to (the dispatcher's resolver), so a name that resolves elsewhere later
(DNS rebinding) cannot reach an internal host; redirects are never followed.
`PAYONCE_WEBHOOK_ALLOW_PRIVATE` lifts the address rule for local development and tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048


class WebhookURLError(ValueError):
    """A webhook URL payonce will not deliver to; the message says why."""


def check_url(url: str) -> tuple[str, int]:
    """(host, port) of a well-formed http(s) URL, or WebhookURLError."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookURLError(f"The URL must be at most {MAX_URL_LENGTH} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookURLError("Invalid URL: it cannot be parsed.") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookURLError("Invalid URL: it must start with https:// or http://.")
    if not parts.hostname:
        raise WebhookURLError("Invalid URL: it has no host.")
    if parts.username is not None or parts.password is not None:
        raise WebhookURLError("Invalid URL: credentials in the URL are not allowed.")
    if any(c.isspace() for c in url) or not url.isprintable():
        raise WebhookURLError("Invalid URL: it contains spaces or control characters.")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def forbidden(address: str) -> str | None:
    """Why payonce does not connect to this IP address, or None for a public one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for reason, test in (("loopback", ip.is_loopback), ("private", ip.is_private),
                         ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                         ("reserved", ip.is_reserved), ("unspecified", ip.is_unspecified)):
        if test:
            return reason
    if not ip.is_global:
        return "not globally routable"
    return None


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, or WebhookURLError when it does not resolve."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookURLError(f"Invalid URL: the host {host[:100]} does not resolve "
                              f"({exc}).") from None
    return sorted({str(info[4][0]) for info in infos})


async def check_deliverable(url: str, *, allow_private: bool) -> None:
    """WebhookURLError unless `url` is well-formed and, unless private addresses are allowed,
    all its host's addresses are public."""
    host, port = check_url(url)
    if allow_private:
        return
    for address in await resolve(host, port):
        reason = forbidden(address)
        if reason is not None:
            raise WebhookURLError(
                f"Invalid URL: {host[:100]} resolves to a {reason} address ({address}); "
                "payonce only delivers webhooks to public addresses.")
