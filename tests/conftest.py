"""Fixtures: every test talks to the real PostgreSQL, Redis and RabbitMQ.

Tests use the `<db>_test` database and the next Redis database of the configured servers.
Each stack (edge + processor) gets its own RabbitMQ prefix, deleted afterwards, and each test
its own account, so tests never wipe shared data.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from contracts.topology import Topology, delete
from edge.app import create_app
from ops.accounts import create_account
from ops.migrate import migrate
from ops.postgres import create_pool
from ops.settings import Settings
from processor.app import Processor
from processor.dispatcher import Dispatcher
from tests import stripe_schema

TERMINAL = ("succeeded", "requires_payment_method", "canceled")


def make_settings(**overrides: Any) -> Settings:
    base = Settings.from_env()
    db = urlsplit(base.database_url)
    redis = urlsplit(base.redis_url)
    redis_db = int(redis.path.strip("/") or 0) + 1
    return base.with_(**{
        "database_url": urlunsplit(db._replace(path=f"{db.path.rstrip('/')}_test")),
        "redis_url": urlunsplit(redis._replace(path=f"/{redis_db}")),
        "secret": "payonce-test-secret",
        "amqp_prefix": f"payonce_test.{uuid.uuid4().hex[:8]}",
        "edge_host": "127.0.0.1",
        "processor_host": "127.0.0.1",
        "edge_port": 0,
        "processor_metrics_port": 0,
        "dispatcher_metrics_port": 0,
        "log_format": "text",
        "psp_latency_ms": (5, 30),
        "psp_timeout_s": 2.0,
        "psp_lease_s": 5.0,
        "sweep_interval_s": 0.2,
        # Refunds that fail later, and the stablecoin chain, at test speed.
        "psp_refund_fail_after_s": 0.5,
        "refund_recheck_s": 0.2,
        "psp_crypto_block_time_s": 0.1,
        "shutdown_grace_s": 10.0,
        # Tests deliver webhooks to receivers on 127.0.0.1.
        "webhook_allow_private": True,
        **overrides,
    })


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a `payonce` subprocess use these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYONCE_")}
    for name in settings.__dataclass_fields__:
        value = getattr(settings, name)
        if isinstance(value, tuple):
            value = f"{value[0]}-{value[1]}"
        env[f"PAYONCE_{name.upper()}"] = str(value)
    env.update(extra)
    return env


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def error(self) -> dict[str, Any]:
        assert isinstance(self.body, dict) and "error" in self.body, self.body
        return self.body["error"]  # type: ignore[no-any-return]


class Client:
    """A Stripe-like client for one account."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, account: dict[str, str],
                 db: Any) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.account_id = account["account"]
        self.secret_key = account["secret_key"]
        self.publishable_key = account["publishable_key"]
        self.db = db

    async def request(self, method: str, path: str, *, data: Any = None, json: Any = None,
                      key: str | None = "auto", auth: str | None = "default",
                      headers: dict[str, str] | None = None, body: bytes | None = None,
                      content_type: str | None = None) -> Reply:
        h = dict(headers or {})
        if auth == "default":
            h["Authorization"] = f"Bearer {self.secret_key}"
        elif auth is not None:
            h["Authorization"] = auth
        if method == "POST" and key is not None:
            h["Idempotency-Key"] = str(uuid.uuid4()) if key == "auto" else key
        if content_type is not None:
            h["Content-Type"] = content_type
        async with self.session.request(method, self.base_url + path, data=body or data,
                                        json=json, headers=h) as resp:
            raw = await resp.read()
            try:
                parsed: Any = await resp.json(content_type=None) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            # Every answer of the API is held to Stripe's published schemas: its objects, and
            # the error every non-2xx must carry for Stripe's libraries to read it.
            if urlsplit(path).path not in ("/health", "/ready", "/metrics"):
                if 200 <= resp.status < 300:
                    stripe_schema.check_object(parsed)
                else:
                    stripe_schema.check("error", parsed)
            return Reply(resp.status, parsed, resp.headers)

    async def post(self, path: str, data: Any = None, **kw: Any) -> Reply:
        return await self.request("POST", path, data=data, **kw)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def create(self, **params: Any) -> Reply:
        return await self.post("/v1/payment_intents", data=form(params))

    async def wait_for(self, intent_id: str, statuses: Iterable[str] = TERMINAL,
                       within_s: float = 30.0) -> dict[str, Any]:
        """Poll until the intent is applied and in one of `statuses`."""
        wanted = set(statuses)
        deadline = time.monotonic() + within_s
        last: Reply | None = None
        while time.monotonic() < deadline:
            last = await self.get(f"/v1/payment_intents/{intent_id}")
            if last.status == 200 and last.body["status"] in wanted:
                return last.body  # type: ignore[no-any-return]
            assert last.status in (200, 425), (last.status, last.body)
            await asyncio.sleep(0.05)
        raise AssertionError(f"{intent_id} not in {wanted} after {within_s}s: {last}")


def form(params: dict[str, Any]) -> dict[str, str]:
    """Stripe's form encoding of nested parameters."""
    out: dict[str, str] = {}
    for name, value in params.items():
        if isinstance(value, dict):
            for k, v in value.items():
                out[f"{name}[{k}]"] = str(v)
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif value is not None:
            out[name] = str(value)
    return out


async def delete_topology(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        await delete(await connection.channel(), Topology(settings.amqp_prefix,
                                                          settings.partitions))


@dataclass
class Stack:
    settings: Settings
    base_url: str
    db: Any
    redis: aioredis.Redis
    session: aiohttp.ClientSession
    processor: Processor | None
    dispatcher: Dispatcher | None = None
    # The edge's aiohttp application, when the stack runs an edge.
    app: web.Application | None = None

    async def client(self) -> Client:
        async with self.db.acquire() as conn:
            account = await create_account(conn, "test")
        return Client(self.session, self.base_url, account, self.db)

    async def start_processor(self) -> Processor:
        assert self.processor is None
        self.processor = Processor(self.settings)
        await self.processor.start()
        return self.processor

    async def stop_processor(self) -> None:
        if self.processor is not None:
            await self.processor.stop()
            self.processor = None

    async def start_dispatcher(self) -> Dispatcher:
        assert self.dispatcher is None
        self.dispatcher = Dispatcher(self.settings)
        await self.dispatcher.start()
        return self.dispatcher

    async def stop_dispatcher(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.stop()
            self.dispatcher = None


@asynccontextmanager
async def stack(settings: Settings | None = None, *, processor: bool = True,
                edge: bool = True, dispatcher: bool = False) -> AsyncIterator[Stack]:
    """An edge (in-process test server) and, optionally, an in-process processor and webhook
    dispatcher."""
    settings = settings or make_settings()
    db = await create_pool(settings.database_url, timeout_s=10.0, min_size=1, max_size=10)
    redis = aioredis.from_url(settings.redis_url)
    session = aiohttp.ClientSession()
    app = create_app(settings) if edge else None
    server = TestServer(app, host="127.0.0.1") if app is not None else None
    s = Stack(settings, "", db, redis, session, None, app=app)
    try:
        if server is not None:
            await server.start_server()
            s.base_url = str(server.make_url("/"))
        if processor:
            await s.start_processor()
        if dispatcher:
            await s.start_dispatcher()
        yield s
    finally:
        await s.stop_dispatcher()
        await s.stop_processor()
        if server is not None:
            await server.close()
        await session.close()
        await redis.aclose()
        await db.close()
        await delete_topology(settings)


@pytest.fixture(scope="session")
async def migrated() -> None:
    database_url = make_settings().database_url
    await migrate(database_url)
    # The test database keeps every earlier run's rows (and `make bench`'s). Where autovacuum
    # is off, as on some CI servers, its tables are never analyzed, and without statistics
    # the planner scans a whole table where production reads an index: a lookup that takes
    # a millisecond there takes seconds here, and times out. Analyzed as autovacuum would.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def shared(migrated: None) -> AsyncIterator[Stack]:
    async with stack() as s:
        yield s


@pytest.fixture
async def api(shared: Stack) -> Client:
    """A client with an account of its own, on the shared stack."""
    return await shared.client()


class Proc:
    """A `payonce` subprocess, to be killed or stopped by signal. Its log goes to a file: an
    unread pipe would fill up and stall the process, and the log explains a failure."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "ops.cli", *self.args], env=self.env,
                stdout=subprocess.DEVNULL, stderr=log)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    async def wait_exit(self, within_s: float) -> int:
        assert self.popen is not None
        return await asyncio.to_thread(self.popen.wait, within_s)

    async def sigterm(self, within_s: float) -> int:
        """SIGTERM, then the exit code; the event loop keeps running meanwhile."""
        assert self.popen is not None
        self.popen.terminate()
        return await self.wait_exit(within_s)

    def stop_quietly(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_http(url: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


@pytest.fixture
def procs() -> Iterable[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop_quietly()


async def start_proc(
    kind: str, settings: Settings, procs: list[Proc], tmp_path: Path, **env: str
) -> Proc:
    """An edge, processor, dispatcher or relay subprocess with these settings, once its
    /health answers."""
    port = {"edge": settings.edge_port, "processor": settings.processor_metrics_port,
            "dispatcher": settings.dispatcher_metrics_port,
            "relay": settings.relay_metrics_port}[kind]
    assert port, "give the subprocess a fixed port to wait for"
    log_path = tmp_path / f"{kind}-{len(procs)}.log"
    proc = Proc([kind], settings_env(settings, **env), log_path).start()
    procs.append(proc)
    try:
        await wait_http(f"http://127.0.0.1:{port}/health")
    except AssertionError:
        raise AssertionError(f"{kind} did not start:\n{proc.log()[-3000:]}") from None
    return proc


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the tests that take private servers: `pytest -m "not private"` leaves out the ones
    that stop and kill servers."""
    for item in items:
        if "private_services" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.private)
