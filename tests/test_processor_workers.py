"""`payonce processor --workers N`: N processor processes, each the active consumer of its own
share of the partitions and a standby for the others; a worker killed has its partitions
taken over by the others and is started again; SIGTERM stops them all cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest

from ops.settings import Settings, SettingsError
from processor.app import share
from tests.conftest import Proc, make_settings, settings_env, stack
from tests.test_edge_workers import children, wait_children
from tests.test_topology import MANAGEMENT_PORT


def worker_of(pid: int) -> int:
    """Which worker a process is, from the environment its supervisor gave it."""
    with open(f"/proc/{pid}/environ", "rb") as environ:
        for item in environ.read().split(b"\0"):
            if item.startswith(b"PAYONCE_PROCESSOR_WORKER="):
                return int(item.split(b"=", 1)[1])
    raise AssertionError(f"{pid} is not a processor worker")


def test_each_worker_is_first_on_its_own_share_of_the_partitions() -> None:
    settings = Settings(partitions=5, processor_workers=2)
    assert share(settings.with_(processor_worker=0)) == ([0, 2, 4], [1, 3])
    assert share(settings.with_(processor_worker=1)) == ([1, 3], [0, 2, 4])
    assert share(Settings(partitions=3)) == ([0, 1, 2], [])
    for wrong in ({"processor_worker": 2}, {"processor_worker": -1},
                  {"processor_workers": 6}):
        with pytest.raises(SettingsError):
            settings.with_(**wrong)


async def active_consumers(settings: Settings) -> dict[int, str]:
    """For each partition queue with an active consumer: the AMQP connection name of the
    process holding it (the management API's view, refreshed every few seconds)."""
    amqp = urlsplit(settings.amqp_url)
    vhost = quote(amqp.path.lstrip("/") or "/", safe="")
    auth = aiohttp.encode_basic_auth(amqp.username or "guest", amqp.password or "guest")
    base = f"http://{amqp.hostname}:{MANAGEMENT_PORT}/api"
    async with aiohttp.ClientSession(headers={"Authorization": auth}) as session:
        async with session.get(f"{base}/vhosts/{vhost}/connections") as resp:
            assert resp.status == 200, await resp.text()
            names = {c["name"]: (c.get("client_properties") or {}).get("connection_name")
                     for c in await resp.json()}
        found: dict[int, str] = {}
        for partition in range(settings.partitions):
            queue = quote(f"{settings.amqp_prefix}.commands.{partition}", safe="")
            async with session.get(f"{base}/queues/{vhost}/{queue}") as resp:
                if resp.status != 200:
                    continue
                info: dict[str, Any] = await resp.json()
            for consumer in info.get("consumer_details") or []:
                tag = consumer.get("consumer_tag")
                if consumer.get("activity_status") == "single_active" or (
                        consumer.get("active") and tag == info.get("single_active_consumer_tag")):
                    details = consumer.get("channel_details")
                    # An empty list while the broker has not filled in the channel yet.
                    if isinstance(details, dict) and details.get("connection_name"):
                        connection = details["connection_name"]
                        found[partition] = names.get(connection) or connection
    return found


async def wait_active(settings: Settings, wanted: dict[int, str], within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while (found := await active_consumers(settings)) != wanted:
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.5)


async def test_workers_share_the_partitions_and_take_over_from_one_killed(
        tmp_path: Path, migrated: None) -> None:
    settings = make_settings(partitions=4)
    supervisor = Proc(["processor", "--workers", "2"], settings_env(settings),
                      tmp_path / "processor.log")
    async with stack(settings, processor=False) as s:
        api = await s.client()
        supervisor.start()
        assert supervisor.popen is not None
        try:
            pids = await wait_children(supervisor.popen.pid, 2)
            await wait_active(settings, {0: "payonce-processor-0", 1: "payonce-processor-1",
                                         2: "payonce-processor-0", 3: "payonce-processor-1"})
            # Read once they run: between fork and exec a child has its parent's environment.
            workers = {worker_of(pid): pid for pid in pids}
            assert sorted(workers) == [0, 1], workers
            # Both stand by for the other's partitions by now.
            deadline = time.monotonic() + 30
            while supervisor.log().count("standing by for the other workers' partitions") < 2:
                assert time.monotonic() < deadline, supervisor.log()[-2000:]
                await asyncio.sleep(0.2)

            async def pay(count: int) -> None:
                made = await asyncio.gather(*(
                    api.create(amount=1000 + i, currency="usd", payment_method="pm_card_visa",
                               confirm="true") for i in range(count)))
                assert all(r.status == 202 for r in made), [r.body for r in made]
                for reply in made:
                    await api.wait_for(reply.body["id"], {"succeeded"})

            await pay(20)
            # Worker 1 dies: worker 0, its standby, takes its partitions at once.
            os.kill(workers[1], signal.SIGKILL)
            await wait_active(settings, dict.fromkeys(range(4), "payonce-processor-0"))
            await pay(20)
            # And it is started again, as a standby now.
            deadline = time.monotonic() + 30
            while workers[1] in (now := children(supervisor.popen.pid)) or len(now) != 2:
                assert time.monotonic() < deadline, now
                await asyncio.sleep(0.2)
            assert await supervisor.sigterm(within_s=60) == 0
            assert children(supervisor.popen.pid) == []
            assert "Traceback" not in supervisor.log()
        finally:
            for pid in children(supervisor.popen.pid):
                os.kill(pid, signal.SIGKILL)
            supervisor.stop_quietly()
