"""Helpers for the webhook tests: a receiver on 127.0.0.1 that answers as each test says and
keeps every request, endpoints written straight into Postgres, and the checks of a delivery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import standardwebhooks
import stripe
from aiohttp import web

from contracts import ids, objects
from ops.settings import Settings

# The only headers a delivery may carry (compared lower-cased).
DELIVERY_HEADERS = {"host", "content-type", "content-length", "user-agent", "stripe-signature",
                    "webhook-id", "webhook-timestamp", "webhook-signature"}


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    number: int  # 1 for the first request to this path

    @property
    def event(self) -> dict[str, Any]:
        return orjson.loads(self.body)  # type: ignore[no-any-return]


Handler = Callable[[Hit], Awaitable[web.StreamResponse]]


async def ok(hit: Hit) -> web.StreamResponse:
    return web.Response(status=200)


@dataclass
class Receiver:
    """An HTTP server: each path answers with its handler (200 by default)."""

    hits: list[Hit] = field(default_factory=list)
    handlers: dict[str, Handler] = field(default_factory=dict)
    finished: list[Hit] = field(default_factory=list)
    port: int = 0

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{path}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        hit = Hit(path, dict(request.headers), await request.read(),
                  1 + sum(1 for h in self.hits if h.path == path))
        self.hits.append(hit)
        response = await self.handlers.get(path, ok)(hit)
        self.finished.append(hit)
        return response

    def at(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    def event_ids(self, path: str) -> set[str]:
        return {h.event["id"] for h in self.at(path)}


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.05)


async def add_endpoint(db: Any, settings: Settings, account_id: str, url: str,
                       events: tuple[str, ...] = ("*",)) -> tuple[str, str]:
    """An endpoint written as the edge writes it: (id, its signing secret)."""
    endpoint_id = ids.random_id("we")
    await db.execute("INSERT INTO webhook_endpoints (id, account_id, url, enabled_events) "
                     "VALUES ($1, $2, $3, $4)", endpoint_id, account_id, url, list(events))
    return endpoint_id, ids.webhook_secret(settings.secret_bytes, endpoint_id)


async def deliveries(db: Any, endpoint_id: str) -> list[Any]:
    return await db.fetch(  # type: ignore[no-any-return]
        "SELECT d.*, ev.type FROM webhook_deliveries d JOIN events ev ON ev.id = d.event_id "
        "WHERE d.endpoint_id = $1 ORDER BY d.event_seq", endpoint_id)


async def attempts(db: Any, delivery_id: str) -> list[Any]:
    return await db.fetch(  # type: ignore[no-any-return]
        "SELECT * FROM webhook_attempts WHERE delivery_id = $1 ORDER BY attempt", delivery_id)


async def all_finished(db: Any, endpoint_id: str, count: int | None = None) -> bool:
    rows = await deliveries(db, endpoint_id)
    return bool(rows) and (count is None or len(rows) == count) and all(
        r["state"] != "pending" for r in rows)


async def events_of(db: Any, account_id: str) -> list[Any]:
    return await db.fetch(  # type: ignore[no-any-return]
        "SELECT * FROM events WHERE account_id = $1 ORDER BY seq", account_id)


def as_api_shows(row: Any) -> dict[str, Any]:
    """The Event as the Events API renders it, without pending_webhooks."""
    event: dict[str, Any] = orjson.loads(orjson.dumps(objects.event(row)))
    event.pop("pending_webhooks")
    return event


def verify(hit: Hit, secret: str) -> None:
    """Both verifiers accept the delivery; only the allowed headers were sent."""
    headers = {k.lower(): v for k, v in hit.headers.items()}
    assert set(headers) <= DELIVERY_HEADERS, set(headers) - DELIVERY_HEADERS
    assert headers["content-type"].startswith("application/json")
    assert headers["user-agent"].startswith("payonce/")
    event = stripe.Webhook.construct_event(hit.body.decode(), headers["stripe-signature"],
                                           secret)
    assert event.id == hit.event["id"]
    parsed = standardwebhooks.Webhook(secret).verify(hit.body, headers)
    assert parsed["id"] == hit.event["id"] == headers["webhook-id"]
