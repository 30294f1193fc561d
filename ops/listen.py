"""`payonce listen --forward-to URL`: webhooks to a local URL, as `stripe listen` does.

It runs a small HTTP server on 127.0.0.1, creates a webhook endpoint for the account pointing
at it (through the API, with the account's secret key), prints the endpoint's signing secret,
and forwards every delivery it receives to the `--forward-to` URL with its body and signature
headers unchanged, so the local code verifies them with that secret as it would in production.
One line per event shows the local answer. The endpoint is deleted on exit (Ctrl-C).

Each delivery is answered 200 once it was forwarded, whatever the local answer, as `stripe
listen` does: the local server's errors are shown, not retried. The dispatcher must be allowed
to reach private addresses (`PAYONCE_WEBHOOK_ALLOW_PRIVATE`, on in `payonce dev`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import uuid
from datetime import datetime
from typing import Any, TextIO

import aiohttp
import orjson
from aiohttp import web

# What a delivery carries that the local code may need to verify and read it.
FORWARDED = ("Content-Type", "User-Agent", "Stripe-Signature", "webhook-id",
             "webhook-timestamp", "webhook-signature")
API_TIMEOUT_S = 10.0


class ListenError(Exception):
    """The endpoint could not be created: the message says why."""


class Listener:
    """The local server, the temporary endpoint and the forwarding."""

    def __init__(self, *, forward_to: str, api_key: str, api_base: str, events: list[str],
                 forward_timeout_s: float, host: str = "127.0.0.1", port: int = 0,
                 out: TextIO | None = None) -> None:
        self.forward_to = forward_to
        self.api_base = api_base.rstrip("/")
        self.events = events
        self.host = host
        self.port = port
        self.endpoint_id: str | None = None
        self.secret: str | None = None
        self.forwarded = 0
        self._api_key = api_key
        self._forward_timeout_s = forward_timeout_s
        self._out = out or sys.stdout
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def _say(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(trust_env=False)
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])
        url = f"http://{self.host}:{self.port}/"
        form = {"url": url, "description": "payonce listen (temporary)",
                **{f"enabled_events[{i}]": e for i, e in enumerate(self.events)}}
        reply = await self._api("POST", "/v1/webhook_endpoints", data=form)
        self.endpoint_id, self.secret = reply["id"], reply["secret"]
        self._say(f"Ready! Your webhook signing secret is {self.secret} (^C to quit)")
        self._say(f"Endpoint {self.endpoint_id} receives {', '.join(self.events)} at {url}; "
                  f"forwarding to {self.forward_to}")

    async def stop(self) -> None:
        try:
            if self.endpoint_id is not None:
                try:
                    await self._api("DELETE", f"/v1/webhook_endpoints/{self.endpoint_id}")
                    self._say(f"Endpoint {self.endpoint_id} deleted.")
                except (ListenError, aiohttp.ClientError, TimeoutError) as exc:
                    self._say(f"Could not delete endpoint {self.endpoint_id}: {exc}")
        finally:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

    async def _api(self, method: str, path: str, data: dict[str, str] | None = None) -> Any:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {self._api_key}"}
        if method == "POST":
            headers["Idempotency-Key"] = str(uuid.uuid4())
        async with self._session.request(
                method, self.api_base + path, data=data, headers=headers,
                timeout=aiohttp.ClientTimeout(total=API_TIMEOUT_S)) as resp:
            raw = await resp.read()
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = {}
        if resp.status != 200:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            message = error.get("message") or raw[:200].decode(errors="replace")
            raise ListenError(f"{method} {path}: {resp.status} {message}")
        return body

    async def _receive(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        headers = {k: request.headers[k] for k in FORWARDED if k in request.headers}
        try:
            event = orjson.loads(body)
            label = f"{event['type']} [{event['id']}]"
        except (orjson.JSONDecodeError, KeyError, TypeError):
            label = f"({len(body)} bytes, not an event)"
        try:
            async with self._session.post(
                    self.forward_to, data=body, headers=headers, allow_redirects=False,
                    skip_auto_headers=("Accept", "Accept-Encoding"),
                    timeout=aiohttp.ClientTimeout(total=self._forward_timeout_s)) as resp:
                await resp.read()
                result = f"[{resp.status}]"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            result = f"[ERROR] {type(exc).__name__}: {exc}"
        self.forwarded += 1
        self._say(f"{datetime.now():%Y-%m-%d %H:%M:%S}   --> {label}  <-- {result} "
                  f"POST {self.forward_to}")
        return web.Response(status=200)


async def listen(listener: Listener) -> None:
    """Run until SIGINT or SIGTERM; the endpoint is deleted on the way out."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await listener.start()
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        await listener.stop()
