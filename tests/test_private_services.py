"""The private servers of tests/private.py: each control once, and the state it leaves the server
in. The fault-injection tests build on these states, so they are checked here, never timings."""

from __future__ import annotations

import asyncio
import os

import aio_pika
import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.private import (  # noqa: F401
    MARKER,
    PrivateServices,
    private_services_fixture,
    reap_stale,
)

SHARED_PORTS = (5432, 6379, 5672)


async def test_settings_point_at_the_private_servers(private_services: PrivateServices) -> None:
    ps = private_services
    settings = ps.settings(partitions=2)
    assert (settings.database_url, settings.redis_url, settings.amqp_url) == (
        ps.database_url, ps.redis_url, ps.amqp_url)
    assert settings.partitions == 2
    assert ps.database == "payonce_test" and ps.database_url.endswith("/payonce_test")
    assert not {ps.pg_port, ps.redis_port, ps.amqp_port} & set(SHARED_PORTS)
    assert ps.processes()
    conn = await asyncpg.connect(ps.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") > 0
    finally:
        await conn.close()


async def test_postgres_pause_resume_restart_stop_start(
    private_services: PrivateServices,
) -> None:
    ps = private_services
    conn = await asyncpg.connect(ps.database_url)
    try:
        await ps.pause_postgres()
        # Half open: the connection stays, a new one is accepted, neither gets an answer.
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 1", timeout=0.5)
        assert not await ps.postgres_answers()
    finally:
        conn.terminate()
    await ps.resume_postgres()

    conn = await asyncpg.connect(ps.database_url)
    try:
        started = await conn.fetchval("SELECT pg_postmaster_start_time()")
        await ps.restart_postgres_immediate()
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()
    conn = await asyncpg.connect(ps.database_url)
    try:
        assert await conn.fetchval("SELECT pg_postmaster_start_time()") > started
    finally:
        await conn.close()

    await ps.stop_postgres()
    assert not await ps.postgres_answers()
    await ps.start_postgres()
    conn = await asyncpg.connect(ps.database_url)
    try:
        # Same data directory: the migrations are still there.
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") > 0
    finally:
        await conn.close()


async def test_redis_flush_kill_start_restart(private_services: PrivateServices) -> None:
    ps = private_services

    async def value() -> bytes | str | None:
        client = aioredis.from_url(ps.redis_url)
        try:
            return await client.get("private-smoke")
        finally:
            await client.aclose()

    async def put() -> None:
        client = aioredis.from_url(ps.redis_url)
        try:
            await client.set("private-smoke", "1")
        finally:
            await client.aclose()

    await put()
    await ps.flush_redis()
    assert await value() is None

    await put()
    await ps.kill_redis()
    assert not await ps.redis_answers()
    await ps.start_redis()
    assert await value() is None  # nothing persisted

    await put()
    await ps.restart_redis()
    assert await value() is None


async def test_rabbitmq_alarm_stop_app_kill_start(private_services: PrivateServices) -> None:
    ps = private_services
    queue_name = "private-smoke"
    connection = await aio_pika.connect(ps.amqp_url)
    async with connection:
        channel = await connection.channel()  # with publisher confirms: the publish is stored
        await channel.declare_queue(queue_name, durable=True,
                                    arguments={"x-queue-type": "quorum"})
        await channel.default_exchange.publish(
            aio_pika.Message(b"survives", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue_name)

    await ps.memory_alarm(True)
    assert await ps.memory_alarm_on()
    blocked = await aio_pika.connect(ps.amqp_url)
    channel = await blocked.channel()
    # The broker holds the publish: no confirm while the alarm lasts. (Unroutable, so the
    # message is dropped once the alarm clears.)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(channel.default_exchange.publish(
            aio_pika.Message(b"held"), routing_key="private-smoke-nowhere", mandatory=False),
            1.0)
    await ps.memory_alarm(False)
    assert not await ps.memory_alarm_on()
    await blocked.close()

    await ps.rabbitmq_stop_app()
    assert not await ps.rabbitmq_answers()
    await ps.rabbitmq_start_app()

    await ps.kill_rabbitmq()
    assert not await ps.rabbitmq_answers()
    await ps.start_rabbitmq()
    connection = await aio_pika.connect(ps.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        message = await queue.get(timeout=10)
        assert message.body == b"survives"
        await message.ack()
        await queue.delete(if_unused=False, if_empty=False)  # quorum queues allow no others


async def test_heal_brings_everything_back(private_services: PrivateServices) -> None:
    ps = private_services
    await ps.pause_postgres()
    await ps.kill_redis()
    await ps.memory_alarm(True)
    await ps.heal()
    assert await ps.postgres_answers()
    assert await ps.redis_answers()
    assert await ps.rabbitmq_answers()
    assert not await ps.memory_alarm_on()


async def test_a_dead_runs_servers_are_stopped_and_removed() -> None:
    """What a killed pytest run leaves (here with Postgres paused, as a test failing midway
    would) is stopped by the next start, and its folder removed."""
    orphan = await PrivateServices.start()
    try:
        await orphan.pause_postgres()
        dead = await asyncio.create_subprocess_exec("true")
        await dead.wait()
        marker = orphan.data_dir / MARKER
        marker.write_text(marker.read_text().replace(f'"owner_pid": {os.getpid()}',
                                                     f'"owner_pid": {dead.pid}'))
        await reap_stale()
        assert not orphan.processes()
        assert not orphan.data_dir.exists()
    finally:
        await orphan.stop()


async def test_shared_servers_still_answer() -> None:
    for port in SHARED_PORTS:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
