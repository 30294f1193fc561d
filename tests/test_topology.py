"""The RabbitMQ definitions file says what payonce declares: the committed file is the
default deployment's, and a topology declared on the real broker, read back through the
management HTTP API, is exactly its definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import aiohttp
import orjson

from contracts.topology import CommandPublisher, Topology, declare, delete
from ops.definitions import render
from ops.settings import Settings
from tests.conftest import make_settings
from tests.test_poison import create_command

COMMITTED = Path(__file__).resolve().parent.parent / "ops" / "rabbitmq" / "definitions.json"
# Where ops/services.sh turns the management plugin on for a local broker.
MANAGEMENT_PORT = 15672


def test_committed_definitions_are_the_default_deployments() -> None:
    assert COMMITTED.read_bytes() == render(Settings()), (
        "regenerate: payonce topology definitions > ops/rabbitmq/definitions.json")


async def read_back(settings: Settings, prefix: str) -> dict[str, list[dict[str, Any]]]:
    amqp = urlsplit(settings.amqp_url)
    vhost = quote(amqp.path.lstrip("/") or "/", safe="")
    auth = aiohttp.encode_basic_auth(amqp.username or "guest", amqp.password or "guest")
    base = f"http://{amqp.hostname}:{MANAGEMENT_PORT}/api"
    found: dict[str, list[dict[str, Any]]] = {}
    async with aiohttp.ClientSession(headers={"Authorization": auth}) as session:
        for kind in ("exchanges", "queues", "bindings"):
            async with session.get(f"{base}/{kind}/{vhost}") as resp:
                assert resp.status == 200, await resp.text()
                items = await resp.json()
            name = "source" if kind == "bindings" else "name"
            found[kind] = [i for i in items if str(i.get(name, "")).startswith(prefix + ".")]
    return found


async def test_what_payonce_declares_is_its_definitions(migrated: None) -> None:
    settings = make_settings(partitions=3)
    topology = Topology(settings.amqp_prefix, settings.partitions)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            await declare(channel, topology)
            found = await read_back(settings, settings.amqp_prefix)
        finally:
            await delete(channel, topology)
    wanted = orjson.loads(render(settings))
    keys = {"exchanges": ("name", "vhost", "type", "durable", "auto_delete", "internal",
                          "arguments"),
            "queues": ("name", "vhost", "durable", "auto_delete", "arguments"),
            "bindings": ("source", "vhost", "destination", "destination_type", "routing_key",
                         "arguments")}
    for kind, fields in keys.items():
        def shape(items: list[dict[str, Any]], fields: tuple[str, ...] = fields) -> list[Any]:
            return sorted(orjson.dumps({f: i[f] for f in fields},
                                        option=orjson.OPT_SORT_KEYS) for i in items)
        assert shape(found[kind]) == shape(wanted[kind]), kind


async def test_a_publisher_whose_channel_closed_opens_another_one() -> None:
    """A robust channel may stay closed after the broker comes back: the publisher then opens
    a new one on its connection instead of failing every publish from then on."""
    settings = make_settings(partitions=1)
    topology = Topology(settings.amqp_prefix, settings.partitions)
    connection = await aio_pika.connect_robust(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            await declare(channel, topology)
            publisher = CommandPublisher(await connection.channel(publisher_confirms=True),
                                         topology, 5.0, connection)
            await publisher.publish(create_command(settings, "acct_" + "a" * 24))
            # Closed for good: a channel its own side closed is never brought back.
            await publisher._channel.close()
            assert not publisher.ready
            # Confirmed and routed (mandatory), or it raises.
            await publisher.publish(create_command(settings, "acct_" + "b" * 24))
            assert publisher.ready
        finally:
            await delete(channel, topology)
