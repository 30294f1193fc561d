"""One command's trouble stays its own: a command that kills the processor is isolated without
taking its neighbours to the dead-letter queue; a dead-lettered command leaves nothing behind
that keeps its intent stuck; background loops and the attempt runner keep going and stay
bounded."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest
from prometheus_client import REGISTRY

from contracts import ids
from contracts.commands import client_message_id
from contracts.topology import Topology, TopologyMismatch, declare, delete
from ops.loops import Loop
from ops.postgres import is_transient
from ops.settings import Settings
from processor import metrics
from processor.attempts import AttemptRunner
from processor.consumer import POISON_STARTS, PartitionConsumer
from tests.conftest import (
    Client,
    Proc,
    form,
    free_port,
    make_settings,
    settings_env,
    stack,
    start_proc,
)
from tests.support import (
    VISA,
    Amounts,
    check_events,
    check_ledger,
    check_outcomes,
    create,
    wait_settled,
)
from tests.test_poison import broker, dead_letters


async def dead_depth(channel: aio_pika.abc.AbstractChannel, settings: Settings) -> int:
    queue = await channel.declare_queue(Topology(settings.amqp_prefix, 1).dead, passive=True)
    return queue.declaration_result.message_count or 0


async def test_command_that_kills_the_processor_is_isolated(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    """A create that crashes the processor every time it is applied, queued ahead of a hundred
    healthy commands on the same partition: each crash returns every command the processor
    held (the broker counts each return as a delivery), yet only the culprit is dead-lettered,
    after POISON_STARTS crashes while it ran alone; every other payment goes through."""
    settings = make_settings(partitions=1, processor_metrics_port=free_port())
    amounts = Amounts(60)
    async with stack(settings, processor=False) as s, broker(settings) as channel:
        api = await s.client()
        key = str(uuid.uuid4())
        poison = await api.post("/v1/payment_intents", form({
            "amount": amounts.take(), "currency": "usd", "description": "poison",
            "payment_method": VISA, "confirm": True}), key=key)
        assert poison.status == 202, poison.body
        healthy = await asyncio.gather(*(
            create(api, amounts.take(), VISA, confirm_separately=i % 2 == 1)
            for i in range(amounts.count - 1)))
        crashes = 0
        while await dead_depth(channel, settings) == 0:
            # Not waiting for /health: it may crash before serving it.
            proc = Proc(["processor"], settings_env(
                settings, PAYONCE_FAILPOINTS="processor.apply=poison"),
                tmp_path / f"processor-{len(procs)}.log").start()
            procs.append(proc)
            while proc.popen is not None and proc.popen.poll() is None:
                if await dead_depth(channel, settings):
                    break
                await asyncio.sleep(0.05)
            else:
                crashes += 1
                assert proc.popen is not None and proc.popen.returncode == 137, proc.log()
                # The first crash on the fresh delivery, then one per start while alone.
                assert crashes <= POISON_STARTS + 1, "the poison was never isolated"
        assert crashes == POISON_STARTS + 1
        intents = await wait_settled(s.db, api.account_id, len(healthy))
        check_outcomes(intents, dict.fromkeys(healthy, VISA))
        dead = await dead_letters(channel, settings, 1)
        assert [d["message_id"] for d in dead] == [client_message_id(api.account_id, key)]
        assert "killed the processor each time it ran" in proc.log()
        # Its 425 marker went with it: the intent that will not exist is unknown, not pending.
        poisoned = ids.intent_id(settings.secret_bytes, api.account_id, key)
        await wait_status(api, f"/v1/payment_intents/{poisoned}", 404)
        assert await s.db.fetchval(
            "SELECT count(*) FROM command_starts WHERE queue = $1",
            Topology(settings.amqp_prefix, 1).queue(0)) == 0


async def wait_status(api: Client, path: str, status: int, within_s: float = 20.0) -> Any:
    async with asyncio.timeout(within_s):
        while (reply := await api.get(path)).status != status:
            await asyncio.sleep(0.1)
    return reply.body


def drop_first(monkeypatch: pytest.MonkeyPatch, command_type: str) -> list[str]:
    """Make the partition consumers dead-letter the first message of `command_type` on sight,
    as a poison message or an exhausted delivery limit would; returns the ids dropped."""
    original = PartitionConsumer._on_message
    dropped: list[str] = []

    async def on_message(self: PartitionConsumer,
                         message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.type == command_type and not dropped:
            dropped.append(message.message_id or "")
            await message.reject(requeue=False)
            return
        await original(self, message)

    monkeypatch.setattr(PartitionConsumer, "_on_message", on_message)
    return dropped


async def test_dead_lettered_psp_result_is_reported_again(
    migrated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped = drop_first(monkeypatch, "payment_intent.psp_result")
    settings = make_settings(psp_report_timeout_s=6.0)
    amounts = Amounts(1)
    async with stack(settings) as s, broker(settings) as channel:
        api = await s.client()
        since = await s.db.fetchval("SELECT now()")
        intent_id = await create(api, amounts.take(), VISA, confirm_separately=False)
        await wait_until(lambda: dead_depth(channel, settings))
        assert dropped
        assert (await api.get(f"/v1/payment_intents/{intent_id}")).body["status"] == "processing"
        assert s.processor is not None
        async with api.session.get(f"http://127.0.0.1:{s.processor.port}/metrics") as resp:
            assert "payonce_dead_letter_queue_messages 1.0" in await resp.text()
        # Reported again once the report timeout passed; applying it settles the intent.
        done = await api.wait_for(intent_id, ["succeeded"], within_s=30)
        assert done["amount_received"] == amounts.base
        assert await s.db.fetchval(
            "SELECT reports FROM payment_attempts WHERE payment_intent_id = $1", intent_id) == 1
        await check_ledger(s.db, api.account_id, amounts, since, {intent_id: 1})
        await check_events(s.db, api.account_id, {intent_id: VISA}, None)


async def wait_until(check: Any, within_s: float = 20.0) -> None:
    async with asyncio.timeout(within_s):
        while not await check():
            await asyncio.sleep(0.05)


async def test_dead_lettered_confirm_leaves_no_marker(
    migrated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A confirm dead-lettered: reads stop announcing `processing` for it, and the next
    confirm is accepted."""
    dropped = drop_first(monkeypatch, "payment_intent.confirm")
    async with stack(make_settings()) as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd", payment_method=VISA)
        intent_id = created.body["id"]
        path = f"/v1/payment_intents/{intent_id}"
        await api.wait_for(intent_id, ["requires_confirmation"])
        confirm = await api.post(f"{path}/confirm")
        assert confirm.status == 202 and confirm.body["status"] == "processing"
        async with asyncio.timeout(20):
            while (await api.get(path)).body["status"] == "processing":
                await asyncio.sleep(0.05)
        assert dropped
        assert (await api.get(path)).body["status"] == "requires_confirmation"
        again = await api.post(f"{path}/confirm")
        assert again.status == 202, again.body
        assert (await api.wait_for(intent_id))["status"] == "succeeded"


async def test_marker_of_an_edge_that_died_before_publishing_lapses(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    """An edge killed between writing a confirm's marker and publishing it: the marker lapses
    at the end of that request's time, not after a day, and the key can be retried at once
    elsewhere (its edge is dead)."""
    settings = make_settings(edge_port=free_port(), publish_timeout_s=1.0, db_timeout_s=1.0,
                             request_timeout_s=3.0, idempotency_lock_ms=60_000)
    async with stack(settings) as s:
        api = await s.client()
        created = await api.create(amount=1000, currency="usd", payment_method=VISA)
        intent_id = created.body["id"]
        path = f"/v1/payment_intents/{intent_id}"
        await api.wait_for(intent_id, ["requires_confirmation"])
        doomed_edge = await start_proc("edge", settings, procs, tmp_path,
                                       PAYONCE_FAILPOINTS="edge.before_publish")
        doomed = Client(s.session, f"http://127.0.0.1:{settings.edge_port}", {
            "account": api.account_id, "secret_key": api.secret_key,
            "publishable_key": api.publishable_key}, s.db)
        key = str(uuid.uuid4())
        with pytest.raises(aiohttp.ClientConnectionError):
            await doomed.post(f"{path}/confirm", key=key)
        assert await doomed_edge.wait_exit(10) == 137
        assert await s.redis.hlen(f"pending:{api.account_id}:{intent_id}") == 1
        body = await wait_status(api, path, 200)
        async with asyncio.timeout(20):
            while body["status"] == "processing":
                await asyncio.sleep(0.1)
                body = (await api.get(path)).body
        assert body["status"] == "requires_confirmation"
        assert await s.redis.hlen(f"pending:{api.account_id}:{intent_id}") == 0
        # The same key, retried: the lock (a minute here) is not waited out.
        async with asyncio.timeout(20):
            while (retry := await api.post(f"{path}/confirm", key=key)).status == 409:
                await asyncio.sleep(0.2)
        assert retry.status == 202, retry.body
        assert (await api.wait_for(intent_id))["status"] == "succeeded"


async def test_events_always_reach_the_webhook_queue(migrated: None) -> None:
    """Events are published mandatory: with the queue that must receive them gone, none is
    marked published into the void; the relay declares it again and delivers them."""
    settings = make_settings()
    topology = Topology(settings.amqp_prefix, settings.partitions)
    async with stack(settings) as s, broker(settings) as channel:
        api = await s.client()
        await channel.queue_delete(topology.webhooks)
        failures = metrics_value("payonce_loop_failures_total", {"loop": "outbox_relay"})
        intent_id = await create(api, 1000, VISA, confirm_separately=False)
        await api.wait_for(intent_id, ["succeeded"])
        await check_events(s.db, api.account_id, {intent_id: VISA}, None)
        queue = await channel.declare_queue(topology.webhooks, passive=True)
        assert (queue.declaration_result.message_count or 0) >= 4
        assert metrics_value("payonce_loop_failures_total", {"loop": "outbox_relay"}) > failures


def metrics_value(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_attempt_runner_holds_tasks_for_its_concurrency_only(migrated: None) -> None:
    """Kicking far more attempts than PSP slots keeps a bounded set of tasks; the rest wait in
    Postgres for the sweeper."""
    settings = make_settings(psp_concurrency=4)
    async with stack(settings, processor=False, edge=False) as s:
        runner = AttemptRunner(s.db, None, None, settings, "none")  # type: ignore[arg-type]
        deferred = metrics_value("payonce_processor_attempts_deferred_total", {})
        before = len(asyncio.all_tasks())
        runner.kick([f"pa_{uuid.uuid4().hex[:24]}" for _ in range(5000)])
        assert len(asyncio.all_tasks()) - before <= settings.psp_concurrency
        assert metrics.ATTEMPTS_WAITING._value.get() <= 4 * settings.psp_concurrency
        assert metrics_value("payonce_processor_attempts_deferred_total", {}) - deferred == (
            5000 - 4 * settings.psp_concurrency)
        await runner.stop(5.0)


async def test_loop_survives_any_exception_and_reports_liveness() -> None:
    calls = 0

    async def body(loop: Loop) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            # What aiormq raises for a publish on a channel a broker restart closed.
            raise aio_pika.exceptions.ChannelInvalidStateError("writer is None")
        loop.beat()
        await asyncio.sleep(3600)

    loop = Loop("test_loop", body, stale_after_s=60)
    loop.start()
    try:
        async with asyncio.timeout(10):
            while calls < 4:
                await asyncio.sleep(0.01)
        assert loop.alive() and loop.failures == 3
    finally:
        await loop.stop()
    assert not loop.alive()

    stalled = Loop("test_stalled", body, stale_after_s=0.05)
    stalled.start()
    try:
        await asyncio.sleep(0.2)
        assert not stalled.alive()  # no beat for longer than it may go without one
    finally:
        await stalled.stop()


@pytest.mark.parametrize(("exc", "transient"), [
    (asyncpg.exceptions.AdminShutdownError(), True),           # 57P01: a restart
    (asyncpg.exceptions.CannotConnectNowError(), True),        # 57P03: still starting
    (asyncpg.exceptions.CrashShutdownError(), True),           # 57P02
    (asyncpg.exceptions.ConnectionFailureError(), True),       # 08006
    (asyncpg.exceptions.TooManyConnectionsError(), True),      # 53300
    (asyncpg.exceptions.QueryCanceledError(), True),           # 57014: a statement timeout
    (asyncpg.exceptions.SerializationError(), True),           # 40001
    (asyncpg.exceptions.DeadlockDetectedError(), True),        # 40P01
    (asyncpg.InterfaceError("connection is closed"), True),
    (TimeoutError(), True),
    (ConnectionResetError(), True),
    (asyncpg.exceptions.UniqueViolationError(), False),        # 23505: the statement's fault
    (asyncpg.exceptions.ForeignKeyViolationError(), False),
    (asyncpg.exceptions.UndefinedColumnError(), False),
    (asyncpg.exceptions.DataError("bad value"), False),
    (ValueError(), False),
])
def test_database_errors_are_classified_by_sqlstate(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


async def test_partition_queue_declared_with_old_arguments_is_named(migrated: None) -> None:
    """A deployment whose partition queues still have the old, low delivery limit: payonce
    does not start on them, and says what to do (replacing them itself could lose a command
    an edge publishes meanwhile)."""
    settings = make_settings(partitions=2)
    topology = Topology(settings.amqp_prefix, settings.partitions)
    old = {**topology.queue_arguments(), "x-delivery-limit": 5}
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            held = await channel.declare_queue(topology.queue(1), durable=True, arguments=old)
            await channel.default_exchange.publish(aio_pika.Message(b"{}"), held.name)
            with pytest.raises(TopologyMismatch,
                               match=r"holds 1 message.*rabbitmqctl delete_queue"):
                await declare(channel, topology)
        finally:
            await delete(await connection.channel(), topology)
