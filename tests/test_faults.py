"""Dependency faults under load: RabbitMQ, PostgreSQL and Redis stopped, killed, paused and
flushed while a few hundred payments are in flight, against private servers the tests start
themselves (tests/private.py), never the machine's shared ones.

Clients retry as stripe-python does (connection errors, 409 and 5xx, with backoff, always
with the same Idempotency-Key), for as long as it takes. After each fault, with no process
restarted by the test: every payment reaches its outcome; every key maps to one intent, one
attempt, one PSP authorization and one charge; every event reached the webhook queue; nothing
is left processing; no client ever got a 500; and `/ready` of the edge and the processor was
red while a dependency was down and is green again.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from contracts import ids
from contracts.topology import Topology
from ops.settings import Settings
from tests.conftest import Client, Proc, Reply, form, free_port, stack, start_proc
from tests.private import (
    PrivateServices,
    private_services_fixture,  # noqa: F401
)
from tests.support import (
    DECLINED,
    EXPECTED_EVENTS,
    VISA,
    Amounts,
    check_ledger,
    check_outcomes,
    unpublished,
    wait_settled,
)

# Short timeouts, so that each fault shows within seconds: a database call gives up after
# 1 s, a publish after 2 s, a request after 4 s, and a key's lock lasts 5 s.
FAULT_SETTINGS: dict[str, Any] = {
    "db_timeout_s": 1.0, "publish_timeout_s": 2.0, "request_timeout_s": 4.0,
    "idempotency_lock_ms": 5000, "psp_latency_ms": (500, 1500), "psp_timeout_s": 3.0,
    "psp_lease_s": 4.0, "psp_report_timeout_s": 10.0, "sweep_interval_s": 0.2,
}
# Each client pays, pauses for about PAUSE_S, and pays again; with the PSP's latency that
# keeps a few hundred payments in flight when a fault hits.
CLIENTS = 32
PAUSE_S = 0.1
# Payments accepted between the start, each fault and the end.
BETWEEN_FAULTS = 80


def retry_delay(attempt: int) -> float:
    """stripe-python's: 0.5 s doubling, capped at 5 s, with jitter down to half."""
    delay = min(0.5 * 2 ** (attempt - 1), 5.0)
    return max(0.5, delay * (0.5 + random.random() / 2))


@dataclass
class Load:
    """Payments made as a merchant's server makes them, until told to stop: each POST retried
    with its key until it has a definite answer."""

    api: Client
    amounts: Amounts
    cards: dict[str, str] = field(default_factory=dict)
    errors: Counter[int | str] = field(default_factory=Counter)
    accepted: int = 0
    posts: int = 0
    stopping: bool = False

    async def post(self, path: str, data: dict[str, str], key: str) -> Reply:
        attempt = 0
        async with asyncio.timeout(120):
            while True:
                attempt += 1
                try:
                    reply = await self.api.post(path, data, key=key)
                except aiohttp.ClientError as exc:
                    self.errors[type(exc).__name__] += 1
                else:
                    if reply.status < 400:
                        return reply
                    self.errors[reply.status] += 1
                    should = reply.headers.get("Stripe-Should-Retry")
                    if reply.status >= 500 and should != "true":
                        self.errors["5xx without Stripe-Should-Retry: true"] += 1
                    if should == "false" or (should is None and reply.status != 409
                                             and reply.status < 500):
                        raise AssertionError(f"{path}: {reply.status} {reply.body}")
                await asyncio.sleep(retry_delay(attempt))

    async def pay(self, n: int) -> None:
        card = DECLINED if n % 4 == 0 else VISA
        amount = str(self.amounts.take())
        self.posts += 1
        if n % 3:
            created = await self.post("/v1/payment_intents", form({
                "amount": amount, "currency": "usd", "payment_method": card,
                "confirm": True}), str(uuid.uuid4()))
        else:
            made = await self.post("/v1/payment_intents", form({
                "amount": amount, "currency": "usd", "payment_method": card}),
                str(uuid.uuid4()))
            self.posts += 1
            created = await self.post(f"/v1/payment_intents/{made.body['id']}/confirm", {},
                                      str(uuid.uuid4()))
        assert created.status == 202, created.body
        self.cards[created.body["id"]] = card
        self.accepted += 1

    async def run(self, clients: int) -> None:
        numbers = itertools.count()

        async def client() -> None:
            for n in numbers:
                if self.stopping:
                    return
                await self.pay(n)
                # A merchant's checkout, not a benchmark: the load lasts through the faults.
                await asyncio.sleep(random.uniform(0, 2 * PAUSE_S))

        await asyncio.gather(*(client() for _ in range(clients)))

    async def until_accepted(self, count: int) -> None:
        async with asyncio.timeout(60):
            while self.accepted < count:
                await asyncio.sleep(0.05)


class ReadyWatch:
    """Polls `/ready` of each process and remembers the answers."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = urls
        self.seen: dict[str, Counter[int]] = {name: Counter() for name in urls}
        self.last: dict[str, int] = {}
        # The last answer of each, for a failure to show which check failed.
        self.said: dict[str, str] = {}

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                for name, url in self.urls.items():
                    try:
                        async with session.get(url) as resp:
                            status = resp.status
                            self.said[name] = await resp.text()
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        status = 0
                        self.said[name] = repr(exc)
                    self.seen[name][status] += 1
                    self.last[name] = status
                await asyncio.sleep(0.2)

    def reset(self) -> None:
        self.seen = {name: Counter() for name in self.urls}

    async def green(self, within_s: float = 60.0) -> None:
        try:
            async with asyncio.timeout(within_s):
                while any(self.last.get(name) != 200 for name in self.urls):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"not ready after {within_s} s: {self.said}") from None

    def was_red(self) -> None:
        for name, statuses in self.seen.items():
            assert statuses[503] > 0, f"{name} /ready never said unavailable: {statuses}"


@dataclass
class Faulty:
    """A stack on the private servers: an edge and a processor, each its own process."""

    services: PrivateServices
    settings: Settings
    api: Client
    db: Any
    edge: Proc
    processor: Proc
    load: Load
    ready: ReadyWatch

    async def fault(self, inject: Callable[[], Awaitable[None]], *, red: bool = True) -> None:
        """Inject a fault while payments flow, then wait until everything is ready again."""
        await self.load.until_accepted(self.load.accepted + BETWEEN_FAULTS)
        self.ready.reset()
        await inject()
        await self.ready.green()
        if red:
            self.ready.was_red()
        for proc in (self.edge, self.processor):
            assert proc.popen is not None and proc.popen.poll() is None, proc.log()[-3000:]


@asynccontextmanager
async def faulty(services: PrivateServices, procs: list[Proc], tmp_path: Path,
                 **overrides: Any) -> AsyncIterator[Faulty]:
    await services.heal()
    settings = services.settings(**{**FAULT_SETTINGS, **overrides}, edge_port=free_port(),
                                 processor_metrics_port=free_port())
    async with stack(settings, processor=False, edge=False) as s:
        edge = await start_proc("edge", settings, procs, tmp_path)
        processor = await start_proc("processor", settings, procs, tmp_path)
        local = await s.client()
        api = Client(s.session, f"http://127.0.0.1:{settings.edge_port}", {
            "account": local.account_id, "secret_key": local.secret_key,
            "publishable_key": local.publishable_key}, s.db)
        ready = ReadyWatch({
            "edge": f"http://127.0.0.1:{settings.edge_port}/ready",
            "processor": f"http://127.0.0.1:{settings.processor_metrics_port}/ready"})
        watching = asyncio.create_task(ready.run())
        try:
            yield Faulty(services, settings, api, s.db, edge, processor,
                         Load(api, Amounts(100_000)), ready)
        finally:
            watching.cancel()
            await services.heal()


async def settled_everywhere(f: Faulty, since: Any, paying: asyncio.Task[None]) -> None:
    """The load stops, then the checks that follow every fault (see the module's docstring)."""
    load = f.load
    await load.until_accepted(load.accepted + BETWEEN_FAULTS)
    load.stopping = True
    await paying
    intents = await wait_settled(f.db, f.api.account_id, load.accepted, within_s=90)
    check_outcomes(intents, load.cards)
    await check_ledger(f.db, f.api.account_id, load.amounts, since,
                       dict.fromkeys(load.cards, 1))
    assert await f.db.fetchval(
        "SELECT count(*) FROM inbox WHERE account_id = $1", f.api.account_id) == load.posts
    # No 500, ever: only 503s (retry), 409s (in flight), 425s (not ready, after Redis lost
    # its markers) and connection errors.
    assert not {s for s in load.errors if s not in (409, 425, 503)
                and (isinstance(s, int) or s.startswith("5xx"))}, load.errors
    await events_delivered(f, intents)


async def events_delivered(f: Faulty, intents: dict[str, Any]) -> None:
    """Every event of the account published, each intent's in order, and each one in the
    webhook queue (the durable queue every event must reach)."""
    async with asyncio.timeout(60):
        while await unpublished(f.db, f.api.account_id):
            await asyncio.sleep(0.1)
    rows = await f.db.fetch("SELECT id, type, object_id, data FROM events "
                            "WHERE account_id = $1 ORDER BY seq", f.api.account_id)
    by_intent: dict[str, list[str]] = {}
    for row in rows:
        obj = row["data"]
        intent_id = obj["id"] if obj["object"] == "payment_intent" else obj["payment_intent"]
        by_intent.setdefault(intent_id, []).append(row["type"])
    assert by_intent == {i: EXPECTED_EVENTS[card] for i, card in f.load.cards.items()}
    wanted = {r["id"] for r in rows}
    seen: set[str] = set()
    connection = await aio_pika.connect(f.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(
            Topology(f.settings.amqp_prefix, f.settings.partitions).webhooks)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            seen.add(message.message_id or "")
    assert not wanted - seen, f"{len(wanted - seen)} events never reached the webhook queue"


async def test_rabbitmq_stopped_and_killed_under_load(
    private_services: PrivateServices, procs: list[Proc], tmp_path: Path
) -> None:
    async with faulty(private_services, procs, tmp_path) as f:
        since = await f.db.fetchval("SELECT now()")
        paying = asyncio.create_task(f.load.run(CLIENTS))

        async def stop_app() -> None:
            await f.services.rabbitmq_stop_app()
            await asyncio.sleep(4)
            await f.services.rabbitmq_start_app()

        async def kill() -> None:
            await f.services.kill_rabbitmq()
            await asyncio.sleep(1)
            await f.services.start_rabbitmq()

        await f.fault(stop_app)
        await f.fault(kill)
        await settled_everywhere(f, since, paying)


async def test_postgres_restarted_and_unreachable_under_load(
    private_services: PrivateServices, procs: list[Proc], tmp_path: Path
) -> None:
    async with faulty(private_services, procs, tmp_path) as f:
        since = await f.db.fetchval("SELECT now()")
        paying = asyncio.create_task(f.load.run(CLIENTS))

        async def restart() -> None:
            await f.services.restart_postgres_immediate()

        async def unreachable() -> None:
            # Connections stay open but nothing answers, for longer than a key's lock.
            await f.services.pause_postgres()
            await asyncio.sleep(f.settings.idempotency_lock_ms / 1000 + 2)
            await f.services.resume_postgres()

        await f.fault(restart)
        await f.fault(unreachable)
        await settled_everywhere(f, since, paying)
        # A database outage is retried in place, never a step towards the dead-letter queue.
        connection = await aio_pika.connect(f.settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            dead = await channel.declare_queue(
                Topology(f.settings.amqp_prefix, 1).dead, passive=True)
            assert dead.declaration_result.message_count == 0


async def test_redis_flushed_and_killed_under_load(
    private_services: PrivateServices, procs: list[Proc], tmp_path: Path
) -> None:
    async with faulty(private_services, procs, tmp_path) as f:
        since = await f.db.fetchval("SELECT now()")
        paying = asyncio.create_task(f.load.run(CLIENTS))
        # Keys, answers and markers forgotten: Postgres' inbox still answers for them.
        await f.fault(f.services.flush_redis, red=False)

        async def kill() -> None:
            await f.services.kill_redis()
            await asyncio.sleep(2)
            await f.services.start_redis()

        await f.fault(kill)
        await settled_everywhere(f, since, paying)


async def test_publish_held_by_a_memory_alarm_is_an_unknown_outcome(
    private_services: PrivateServices, procs: list[Proc], tmp_path: Path
) -> None:
    """A broker under a memory alarm holds published frames, then enqueues them. The edge
    cannot know: it answers 503 "outcome unknown", keeps the key's fingerprint, and never
    accepts a different request under the key; the held command is applied once the alarm
    clears, and the retry learns the outcome."""
    async with faulty(private_services, procs, tmp_path) as f:
        api = f.api
        key = str(uuid.uuid4())
        params = form({"amount": 1500, "currency": "usd", "payment_method": VISA,
                       "confirm": True})
        await f.services.memory_alarm(True)
        try:
            held = await api.post("/v1/payment_intents", params, key=key)
            assert held.status == 503, held.body
            assert held.error["code"] == "outcome_unknown"
            assert held.headers["Stripe-Should-Retry"] == "true"
            other = await api.post("/v1/payment_intents", {**params, "amount": "1600"}, key=key)
            assert other.status == 400 and other.error["type"] == "idempotency_error"
        finally:
            await f.services.memory_alarm(False)
        intent_id = ids.intent_id(f.settings.secret_bytes, api.account_id, key)
        async with asyncio.timeout(30):
            while await f.db.fetchval("SELECT status FROM payment_intents WHERE id = $1",
                                      intent_id) != "succeeded":
                await asyncio.sleep(0.1)
        retry = await f.load.post("/v1/payment_intents", params, key)
        assert retry.status == 202 and retry.body["id"] == intent_id
        assert retry.body["status"] == "succeeded"
        assert await f.db.fetchval("SELECT count(*) FROM payment_intents WHERE account_id = $1",
                                   api.account_id) == 1
        other = await api.post("/v1/payment_intents", {**params, "amount": "1600"}, key=key)
        assert other.status == 400 and other.error["type"] == "idempotency_error"


async def test_psp_slow_failing_and_losing_replies_under_load(
    private_services: PrivateServices, procs: list[Proc], tmp_path: Path
) -> None:
    """The PSP times out, answers 5xx and loses replies after it charged, all at once: every
    attempt is retried with its PSP key until the PSP's own answer is known, so each payment
    gets the outcome of its card and exactly one authorization."""
    async with faulty(
        private_services, procs, tmp_path, psp_latency_ms=(50, 300), psp_timeout_s=0.5,
        psp_lease_s=2.0, psp_error_rate=0.15, psp_timeout_rate=0.15, psp_lost_reply_rate=0.15,
        # Twelve tries leave 0.3**12 of attempts that never reached the PSP.
        psp_max_tries=12,
    ) as f:
        since = await f.db.fetchval("SELECT now()")
        paying = asyncio.create_task(f.load.run(CLIENTS))
        await settled_everywhere(f, since, paying)
        psp = await f.db.fetchval(
            "SELECT count(*) FROM psp.charges WHERE created_at >= $1", since)
        assert psp == len(f.load.cards)
        assert "psp replayed a charge" in f.processor.log()
        assert "psp timed out; retrying with the same key" in f.processor.log()


async def test_processes_stop_on_sigterm_with_every_dependency_down(
    private_services: PrivateServices, procs: list[Proc], tmp_path: Path
) -> None:
    """RabbitMQ and Redis killed and PostgreSQL paused: SIGTERM still stops the edge, the
    processor and the dispatcher, each within its grace period, instead of waiting for
    dependencies that are gone."""
    await private_services.heal()
    settings = private_services.settings(**FAULT_SETTINGS, edge_port=free_port(),
                                         processor_metrics_port=free_port(),
                                         dispatcher_metrics_port=free_port())
    try:
        running = [await start_proc(kind, settings, procs, tmp_path)
                   for kind in ("edge", "processor", "dispatcher")]
        await private_services.kill_rabbitmq()
        await private_services.kill_redis()
        await private_services.pause_postgres()
        for proc in running:
            code = await proc.sigterm(within_s=settings.shutdown_grace_s + 15)
            assert code == 0, proc.log()[-3000:]
    finally:
        await private_services.heal()
