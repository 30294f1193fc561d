"""Headless Chromium driven over the Chrome DevTools protocol (a WebSocket, through aiohttp),
for tests that look at a page as a person's browser renders it.

Chromium runs with a fresh profile and without its background services (updates, sync,
safe browsing lists): on a closed network those would only fail, slowly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0")
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


@dataclass
class Page:
    """One tab: what it requested, how each request ended, and what it logged."""

    ws: aiohttp.ClientWebSocketResponse
    session_id: str
    requests: dict[str, str] = field(default_factory=dict)  # request id -> URL
    failed: dict[str, str] = field(default_factory=dict)  # request id -> blocked reason/error
    log: list[str] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _waiting: dict[int, asyncio.Future[Any]] = field(default_factory=dict)

    async def send(self, method: str, **params: Any) -> Any:
        number = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        await self.ws.send_json({"id": number, "method": method, "params": params,
                                 "sessionId": self.session_id})
        return await future

    def receive(self, message: dict[str, Any]) -> None:
        if "id" in message:
            future = self._waiting.pop(message["id"], None)
            if future is not None and not future.done():
                if "error" in message:
                    future.set_exception(RuntimeError(f"CDP error: {message['error']}"))
                else:
                    future.set_result(message.get("result"))
            return
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests[params["requestId"]] = params["request"]["url"]
        elif method == "Network.loadingFailed":
            self.failed[params["requestId"]] = params.get("blockedReason") or params.get(
                "errorText", "")
        elif method == "Runtime.exceptionThrown":
            self.log.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Log.entryAdded":
            entry = params["entry"]
            self.log.append(f"{entry['level']}: {entry['text']}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.log.append("console.error: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in params["args"]))

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def page(url: str) -> AsyncIterator[Page]:
    """A tab of a fresh headless Chromium, navigated to `url` (the page may still be loading)."""
    assert CHROMIUM is not None, "chromium is not installed"
    with tempfile.TemporaryDirectory(prefix="payonce-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        drain: asyncio.Task[bytes] | None = None
        try:
            assert proc.stderr is not None
            endpoint = None
            async with asyncio.timeout(60):
                while endpoint is None:
                    line = await proc.stderr.readline()
                    if not line:
                        raise AssertionError("chromium exited before it listened")
                    match = _LISTENING.search(line.decode(errors="replace"))
                    endpoint = match[1] if match else None
            # Its log is not read any more: drain it, so a full pipe never stalls it.
            drain = asyncio.create_task(proc.stderr.read())
            async with aiohttp.ClientSession() as http, http.ws_connect(
                    endpoint, max_msg_size=0) as ws:
                await ws.send_json({"id": 1, "method": "Target.createTarget",
                                    "params": {"url": "about:blank"}})
                target = await _reply(ws, 1)
                await ws.send_json({"id": 2, "method": "Target.attachToTarget", "params": {
                    "targetId": target["targetId"], "flatten": True}})
                attached = await _reply(ws, 2)
                tab = Page(ws, attached["sessionId"])
                tab._ids = itertools.count(3)
                reader = asyncio.create_task(_read(ws, tab))
                try:
                    for domain in ("Network", "Runtime", "Log", "Page"):
                        await tab.send(f"{domain}.enable")
                    await tab.send("Page.navigate", url=url)
                    yield tab
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
        finally:
            if drain is not None:
                drain.cancel()
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _reply(ws: aiohttp.ClientWebSocketResponse, number: int) -> Any:
    async with asyncio.timeout(30):
        while True:
            message = await ws.receive_json()
            if message.get("id") == number:
                assert "error" not in message, message
                return message["result"]


async def _read(ws: aiohttp.ClientWebSocketResponse, tab: Page) -> None:
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            tab.receive(message.json())
