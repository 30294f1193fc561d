"""`payonce edge --workers N`: N edge processes on one port, every request answered by one of
them, `/metrics` counting all of them together, a worker that dies started again, and a
clean stop of them all on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp

from tests.conftest import Client, Proc, free_port, make_settings, settings_env, stack, wait_http


def children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return sorted(found)


async def wait_children(pid: int, count: int, within_s: float = 20.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if len(found := children(pid)) == count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"{pid} has children {children(pid)}, not {count}")


async def requests_counted(session: aiohttp.ClientSession, base: str) -> float:
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("payonce_edge_requests_total{")
               and 'route="/v1/payment_intents"' in line)


async def test_workers_share_the_port_count_together_and_stop_cleanly(
        procs: list[Proc], tmp_path: Path) -> None:
    settings = make_settings(edge_port=free_port())
    base = f"http://127.0.0.1:{settings.edge_port}"
    async with stack(settings, edge=False) as s:
        local = await s.client()
        edge = Proc(["edge", "--workers", "2"], settings_env(settings),
                    tmp_path / "edge.log").start()
        procs.append(edge)
        assert edge.popen is not None
        await wait_http(f"{base}/ready")
        workers = await wait_children(edge.popen.pid, 2)
        api = Client(s.session, base, {"account": local.account_id,
                                       "secret_key": local.secret_key,
                                       "publishable_key": local.publishable_key}, s.db)
        # Fresh connections, so the kernel may hand them to either worker.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as one:
            api.session = one
            made = await asyncio.gather(*(
                api.create(amount=1000 + i, currency="usd", payment_method="pm_card_visa",
                           confirm="true") for i in range(40)))
            assert all(r.status == 202 for r in made), [r.body for r in made if r.status != 202]
            for reply in made:
                await api.wait_for(reply.body["id"], {"succeeded"})
            # Whichever worker answers the scrape counts every worker's requests.
            for _ in range(4):
                assert await requests_counted(one, base) == 40

        # A worker that dies is replaced; the port keeps answering meanwhile.
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            now = children(edge.popen.pid)
            if len(now) == 2 and workers[0] not in now:
                break
            assert time.monotonic() < deadline, now
            await asyncio.sleep(0.1)
        await wait_http(f"{base}/ready")

        assert await edge.sigterm(within_s=40) == 0
        assert children(edge.popen.pid) == []
        assert "Traceback" not in edge.log()
