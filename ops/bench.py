"""`make bench`: load figures for the README, from a real edge and processor.

Starts `payonce edge` and `payonce processor` as separate processes (against the configured
services, in the test database, with a RabbitMQ prefix of its own), then measures:

- accept: POST /v1/payment_intents with confirm=true at a fixed concurrency: 202s per second
  and latency percentiles (the edge's path: auth, validation, Redis, publish with confirm);
- settle: how long until every one of those intents reached `succeeded` (the processor's path,
  with the simulated PSP's latency);
- replay: the same POSTs again with the same keys (answered from Redis);
- read: GET /v1/payment_intents/{id};
- CPU: milliseconds of CPU per settled payment for each process (edge, processor, dispatcher,
  PostgreSQL, RabbitMQ, Redis) over the accept+settle run, from /proc, and each payonce
  process's peak RSS;
- open loop: accept latency at fixed offered rates (OPEN_LOOP_RATES), requests sent on a
  schedule rather than after the previous answer;
- mixed: payments taken through create, confirm, capture, cancel and refund (MIX), with the
  commands sent and the CPU per command of each process until every one is at rest;
- deliver: a `payonce dispatcher` runs beside them, delivering every event of those payments to
  one endpoint, a receiver in this process that answers 200 at once: events delivered per
  second (from the first event's commit to the last delivery), the delivery lag (event
  committed → receiver got it) and the dispatcher's CPU time, read from /proc;
- deliver at fixed rates: the relay and the dispatcher alone (ops/bench_deliver.py), at
  event rates above the processor's full settle rate, and with a second endpoint that hangs.

Every loop is bounded by a request count; nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiohttp
import asyncpg
from aiohttp import web

from contracts.ids import random_id
from contracts.topology import Topology, delete
from ops.accounts import create_account
from ops.migrate import migrate
from ops.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ROLES = ("processor", "edge", "dispatcher", "relay")
# Every event should be delivered long before this once the payments settled.
DELIVERY_WAIT_S = 120.0


def _start(env: dict[str, str], roles: tuple[str, ...]) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-m", "ops.cli", role], env=env)
            for role in roles]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The services' processes, by the name the kernel gives them (/proc/PID/comm).
SERVICE_COMMS = {"postgres": "PostgreSQL", "beam.smp": "RabbitMQ", "redis-server": "Redis"}
# Offered rates of the open-loop accept runs, and how long each runs.
OPEN_LOOP_RATES = (250, 500, 1000)
OPEN_LOOP_S = 5.0


def _service_pids() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {name: [] for name in SERVICE_COMMS.values()}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/comm") as comm:
                    name = SERVICE_COMMS.get(comm.read().strip())
            except OSError:
                continue
            if name is not None:
                found[name].append(int(entry.name))
    return found


def _with_children(pid: int) -> list[int]:
    """The process and its children: a supervisor's workers (`--workers N`) count as its
    own."""
    found = [pid]
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def _peak_rss_mb(pid: int) -> float:
    """The highest peak RSS of the process and its children."""
    peak = 0.0
    for one in _with_children(pid):
        try:
            with open(f"/proc/{one}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peak


class CPUMeter:
    """CPU seconds of every process that works on a payment, from /proc, since the meter was
    made. PostgreSQL backends come and go (a pool closes the ones idle for a while): one that
    ended counts up to the last time it was read, so read often (`sample`) over a long run;
    the PostgreSQL figure is a floor."""

    def __init__(self, payonce: dict[str, int]) -> None:
        self.payonce = payonce
        self._last: dict[str, dict[int, float]] = {}
        self.sample()
        self._start = {pid: cpu for seen in self._last.values() for pid, cpu in seen.items()}

    def sample(self) -> None:
        """Read every process now."""
        found = {role: _with_children(pid) for role, pid in self.payonce.items()}
        found.update(_service_pids())
        for name, pids in found.items():
            seen = self._last.setdefault(name, {})
            for pid in pids:
                try:
                    seen[pid] = _cpu_seconds(pid)
                except OSError:  # exited meanwhile (a PostgreSQL backend)
                    pass

    def since_start(self) -> dict[str, float]:
        self.sample()
        return {name: sum(cpu - self._start.get(pid, 0.0) for pid, cpu in seen.items())
                for name, seen in self._last.items()}


class Receiver:
    """The webhook receiver: answers 200 at once (or after `hang_s`) and notes when each event
    first arrived."""

    def __init__(self, hang_s: float = 0.0) -> None:
        self.hang_s = hang_s
        self.first_seen: dict[str, float] = {}

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        self.first_seen.setdefault(request.headers["webhook-id"], time.time())
        return web.Response(status=200)

    async def start(self) -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_post("/", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, int(runner.addresses[0][1])


def _cpu() -> str:
    with open("/proc/cpuinfo") as info:
        models = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return models[0] if models else platform.processor()


def _percentiles(samples: list[float]) -> str:
    cuts = statistics.quantiles(samples, n=100)
    return f"p50 {cuts[49] * 1000:.1f} ms, p95 {cuts[94] * 1000:.1f} ms, " \
           f"p99 {cuts[98] * 1000:.1f} ms"


def histogram_quantiles(metrics: str, name: str, quantiles: tuple[float, ...]) -> list[float]:
    """Quantiles of a Prometheus histogram in a /metrics text, interpolated linearly within
    its buckets as Prometheus's histogram_quantile() does (NaN when it holds nothing)."""
    buckets: list[tuple[float, float]] = []
    for line in metrics.splitlines():
        if line.startswith(f'{name}_bucket{{le="'):
            le = line.split('"')[1]
            buckets.append((math.inf if le == "+Inf" else float(le), float(line.split()[-1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    found = []
    for q in quantiles:
        if not total:
            found.append(math.nan)
            continue
        rank = q * total
        lower, below = 0.0, 0.0
        for bound, count in buckets:
            if count >= rank:
                if math.isinf(bound):
                    found.append(lower)
                else:
                    inside = count - below
                    found.append(lower + (bound - lower) * (rank - below) / inside if inside
                                 else bound)
                break
            lower, below = bound, count
    return found


async def _run(session: aiohttp.ClientSession, n: int, concurrency: int,
               request: Any) -> tuple[float, list[float], list[Any]]:
    latencies: list[float] = []
    results: list[Any] = [None] * n
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            results[i] = await request(session, i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, results


@dataclass
class Deployment:
    """A running payonce (ROLES as processes) with an account and a webhook endpoint on a
    Receiver in this process, in the test database, under a RabbitMQ prefix of its own."""

    base: str
    conn: Any
    account: dict[str, str]
    receiver: Receiver
    roles: tuple[str, ...]
    procs: list[subprocess.Popen[bytes]]
    # /metrics of the process that runs the outbox relay.
    relay_metrics: str

    def pid(self, role: str) -> int:
        return self.procs[self.roles.index(role)].pid


@asynccontextmanager
async def deployment(settings: Settings, latency: str,
                     relay_apart: bool) -> AsyncIterator[Deployment]:
    db = urlsplit(settings.database_url)
    database_url = urlunsplit(db._replace(path=f"{db.path.rstrip('/')}_test"))
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    account = await create_account(conn, "bench")
    port = _free_port()
    topology = Topology(f"payonce_bench.{uuid.uuid4().hex[:6]}", settings.partitions)
    receiver = Receiver()
    receiver_runner, receiver_port = await receiver.start()
    endpoint_id = random_id("we")
    await conn.execute(
        "INSERT INTO webhook_endpoints (id, account_id, url, enabled_events) "
        "VALUES ($1, $2, $3, $4)", endpoint_id, account["account"],
        f"http://127.0.0.1:{receiver_port}/", ["*"])
    env = {**os.environ, "PAYONCE_DATABASE_URL": database_url,
           "PAYONCE_AMQP_PREFIX": topology.prefix,
           "PAYONCE_SECRET": "bench-secret", "PAYONCE_EDGE_PORT": str(port),
           "PAYONCE_EDGE_HOST": "127.0.0.1", "PAYONCE_PSP_LATENCY_MS": latency,
           "PAYONCE_PROCESSOR_METRICS_PORT": str(_free_port()),
           "PAYONCE_DISPATCHER_METRICS_PORT": str(_free_port()),
           "PAYONCE_RELAY_METRICS_PORT": str(_free_port()),
           "PAYONCE_PROCESSOR_RELAY": "false" if relay_apart else "true",
           # The receiver is on 127.0.0.1.
           "PAYONCE_WEBHOOK_ALLOW_PRIVATE": "true", "PAYONCE_LOG_LEVEL": "WARNING"}
    roles = ROLES if relay_apart else tuple(r for r in ROLES if r != "relay")
    procs = _start(env, roles)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"{base}/ready") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        relay_port = env["PAYONCE_RELAY_METRICS_PORT" if relay_apart
                         else "PAYONCE_PROCESSOR_METRICS_PORT"]
        yield Deployment(base, conn, account, receiver, roles, procs,
                         f"http://127.0.0.1:{relay_port}/metrics")
    finally:
        await tear_down(settings, topology, procs, conn, [receiver_runner])


async def tear_down(settings: Settings, topology: Topology, procs: list[subprocess.Popen[bytes]],
                    conn: Any, runners: list[web.AppRunner]) -> None:
    """Stops the processes, closes the connection and the receivers, deletes the topology."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(30)
    await conn.close()
    for runner in runners:
        await runner.cleanup()
    amqp = await aio_pika.connect(settings.amqp_url)
    async with amqp:
        await delete(await amqp.channel(), topology)


BODY = {"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa",
        "confirm": "true"}


async def bench(settings: Settings, n: int, concurrency: int, latency: str,
                relay_apart: bool, mixed_n: int, deliver: bool) -> None:
    keys = [str(uuid.uuid4()) for _ in range(n)]
    body = BODY
    async with deployment(settings, latency, relay_apart) as d:
        base, conn, account, receiver, roles, procs = (
            d.base, d.conn, d.account, d.receiver, d.roles, d.procs)
        dispatcher = procs[roles.index("dispatcher")]
        headers = {"Authorization": f"Bearer {account['secret_key']}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async def post(session: aiohttp.ClientSession, i: int) -> str:
                async with session.post(f"{base}/v1/payment_intents", data=body,
                                        headers={"Idempotency-Key": keys[i]}) as resp:
                    assert resp.status == 202, await resp.text()
                    return str((await resp.json())["id"])

            async def get(session: aiohttp.ClientSession, i: int) -> None:
                async with session.get(f"{base}/v1/payment_intents/{ids[i]}") as resp:
                    assert resp.status in (200, 425)
                    await resp.read()

            meter = CPUMeter({role: proc.pid for role, proc in zip(roles, procs, strict=True)})
            accept_s, accept_lat, ids = await _run(session, n, concurrency, post)
            settle_started = time.perf_counter()
            while True:
                done = await conn.fetchval(
                    "SELECT count(*) FROM payment_intents WHERE account_id = $1 "
                    "AND status = 'succeeded'", account["account"])
                if done == n:
                    break
                await asyncio.sleep(0.05)
            settle_s = accept_s + time.perf_counter() - settle_started
            settle_cpu = meter.since_start()
            replay_s, replay_lat, _ = await _run(session, n, concurrency, post)
            read_s, read_lat, _ = await _run(session, n, concurrency, get)
            ledger = await conn.fetchval(
                "SELECT count(*) FROM psp.charges c JOIN payment_attempts a "
                "ON a.psp_key = c.idempotency_key WHERE a.account_id = $1", account["account"])
            events = {r["id"]: r["created"].timestamp() for r in await conn.fetch(
                "SELECT id, created FROM events WHERE account_id = $1", account["account"])}
            deadline = time.monotonic() + DELIVERY_WAIT_S
            while len(receiver.first_seen.keys() & events.keys()) < len(events):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            async with session.get(d.relay_metrics) as resp:
                relay_lag = histogram_quantiles(await resp.text(),
                                                "payonce_processor_event_publish_seconds",
                                                (0.5, 0.95, 0.99))
            dispatcher_cpu_s = _cpu_seconds(dispatcher.pid)
            open_loop = [await _open_loop(headers, base, rate, body) for rate in OPEN_LOOP_RATES]
            peak_rss = {role: _peak_rss_mb(proc.pid) for role, proc in zip(roles, procs,
                                                                           strict=True)}
        mixed = await _mixed(d, mixed_n, concurrency) if mixed_n else ""
    delivering = ""
    if deliver:
        # Imported here: ops.bench_deliver builds on this module.
        from ops import bench_deliver
        delivering = await bench_deliver.table(settings)

    delivered = {i: t for i, t in receiver.first_seen.items() if i in events}
    lags = [t - events[i] for i, t in delivered.items()]
    deliver_s = max(delivered.values()) - min(events.values())
    relay = ', '.join(f'p{q} {v * 1000:.0f} ms' for q, v in zip((50, 95, 99), relay_lag,
                                                                strict=True))
    deliver_rate = len(delivered) / deliver_s
    cpu = _cpu()
    as_workers = [f"the {role} as {count} workers" for role, count in
                  (("edge", settings.edge_workers), ("processor", settings.processor_workers))
                  if count > 1]
    workers = f" ({', '.join(as_workers)})" if as_workers else ""
    print(f"""
payonce benchmark: {n} payments, {concurrency} concurrent clients, PSP latency {latency} ms
machine: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, one process each of
{", ".join(roles)}{workers}, PostgreSQL/Redis/RabbitMQ on the same machine

| what | rate | latency |
|---|---|---|
| accept (POST confirm=true → 202) | {n / accept_s:.0f}/s | {_percentiles(accept_lat)} |
| settle (all {n} succeeded, from the first POST) | {n / settle_s:.0f}/s | {settle_s:.1f} s total |
| replay (same key → stored 202) | {n / replay_s:.0f}/s | {_percentiles(replay_lat)} |
| read (GET intent) | {n / read_s:.0f}/s | {_percentiles(read_lat)} |
| deliver (webhooks, {len(delivered)} of {len(events)} events) | {deliver_rate:.0f}/s \
| lag {_percentiles(lags)} |
| relay (event written → confirmed by RabbitMQ; the relay's histogram) | | lag {relay} |

CPU per settled payment, from the first POST until all {n} succeeded (/proc; every process
on the machine with these names, so other load on it counts too):

| process | CPU ms per payment |
|---|---|
{_cpu_rows(settle_cpu, n)}

Peak RSS: {", ".join(f"{role} {mb:.0f} MB" for role, mb in peak_rss.items())}

Accept latency at fixed offered rates (open loop: each POST sent on schedule, {OPEN_LOOP_S:.0f} s
each, while the earlier payments still settle; refused: 429 from the edge's bound on POSTs at
once, PAYONCE_EDGE_MAX_POSTS={settings.edge_max_posts}):

| offered | accepted (202) | latency of the 202s | refused (429) |
|---|---|---|---|
{chr(10).join(open_loop)}

PSP ledger rows for the {n} payments: {ledger} (one per attempt)
Dispatcher CPU time: {dispatcher_cpu_s:.1f} s for {len(delivered)} deliveries \
({dispatcher_cpu_s / max(len(delivered), 1) * 1000:.2f} ms each), \
{dispatcher_cpu_s / deliver_s * 100:.0f}% of a core while it delivered
{mixed}{delivering}""")


def _cpu_rows(cpu: dict[str, float], payments: int) -> str:
    rows = [f"| {name} | {seconds * 1000 / payments:.2f} |" for name, seconds in cpu.items()]
    total = sum(cpu.values()) * 1000 / payments
    return "\n".join([*rows, f"| **total** | **{total:.2f}** |"])


async def _open_loop(headers: dict[str, str], base: str, rate: int,
                     body: dict[str, str]) -> str:
    """POSTs sent at `rate` per second on a fixed schedule, whatever the answers: a stall
    shows in the percentiles instead of slowing the senders down. Each POST has a connection
    of its own when it needs one (no client-side pool to wait in); the 429s of the edge's
    bound (edge/admission.py) are counted apart from the 202s."""
    latencies: list[float] = []
    refused: list[float] = []
    failures = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        started = time.perf_counter()
        try:
            async with session.post(f"{base}/v1/payment_intents", data=body,
                                    headers={"Idempotency-Key": str(uuid.uuid4())}) as resp:
                await resp.read()
                if resp.status == 429:
                    refused.append(time.perf_counter() - started)
                    return
                if resp.status != 202:
                    failures += 1
                    return
        except aiohttp.ClientError:
            failures += 1
            return
        latencies.append(time.perf_counter() - started)

    count = int(rate * OPEN_LOOP_S)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        begin = time.perf_counter()
        tasks = []
        for i in range(count):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    answered = f"{len(latencies) / elapsed:.0f}/s" + (f", {failures} failed" if failures else "")
    percentiles = _percentiles(latencies) if len(latencies) > 1 else "-"
    shed = (f"{len(refused)} (p99 {statistics.quantiles(refused, n=100)[98] * 1000:.1f} ms)"
            if len(refused) > 1 else str(len(refused)))
    return f"| {rate}/s | {answered} | {percentiles} | {shed} |"

# The mixed workload: (flow, share out of 10). Each payment is created, then taken through
# its flow with the commands a merchant would send; every command goes through the same
# batched path as create and confirm.
MIX = (("automatic, then refunded in part", 4), ("manual, then captured in part", 3),
       ("manual, then canceled", 2), ("never confirmed, then canceled", 1))
RESTING = """
SELECT (SELECT count(*) FROM payment_intents WHERE account_id = $1
        AND status NOT IN ('succeeded', 'canceled'))
     + (SELECT count(*) FROM refunds WHERE account_id = $1 AND status = 'pending')
"""


async def _mixed(d: Deployment, n: int, concurrency: int) -> str:
    """Runs n payments through MIX and tells the commands sent and the CPU each cost."""
    headers = {"Authorization": f"Bearer {d.account['secret_key']}"}
    flows = [name for name, share in MIX for _ in range(share)]
    sent: dict[str, int] = {}
    gate = asyncio.Semaphore(concurrency)

    async def post(session: aiohttp.ClientSession, what: str, path: str,
                   data: dict[str, str]) -> dict[str, Any]:
        async with session.post(f"{d.base}{path}", data=data,
                                headers={"Idempotency-Key": str(uuid.uuid4())}) as resp:
            body = await resp.json()
            assert resp.status == 202, (path, resp.status, body)
        sent[what] = sent.get(what, 0) + 1
        return body  # type: ignore[no-any-return]

    async def until(session: aiohttp.ClientSession, intent_id: str, status: str) -> None:
        while True:
            async with session.get(f"{d.base}/v1/payment_intents/{intent_id}",
                                   params={"wait": "10"}) as resp:
                body = await resp.json()
            if resp.status == 200 and body["status"] == status:
                return
            if resp.status == 425:
                await asyncio.sleep(0.05)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        flow = flows[i % len(flows)]
        create = {"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa"}
        async with gate:
            if flow.startswith("never"):
                intent = await post(session, "create", "/v1/payment_intents", create)
                await post(session, "cancel", f"/v1/payment_intents/{intent['id']}/cancel",
                           {"cancellation_reason": "abandoned"})
                return
            manual = flow.startswith("manual")
            intent = await post(session, "create + confirm", "/v1/payment_intents", {
                **create, "confirm": "true",
                "capture_method": "manual" if manual else "automatic"})
            path = f"/v1/payment_intents/{intent['id']}"
        await until(session, intent["id"], "requires_capture" if manual else "succeeded")
        async with gate:
            if flow.startswith("automatic"):
                await post(session, "refund", "/v1/refunds",
                           {"payment_intent": intent["id"], "amount": "500"})
            elif "captured" in flow:
                await post(session, "capture", f"{path}/capture", {"amount_to_capture": "1500"})
            else:
                await post(session, "cancel", f"{path}/cancel",
                           {"cancellation_reason": "requested_by_customer"})

    meter = CPUMeter({role: d.pid(role) for role in d.roles})
    started = time.perf_counter()
    async with aiohttp.ClientSession(headers=headers,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(one(session, i) for i in range(n)))
    while True:
        if not await d.conn.fetchval(RESTING, d.account["account"]):
            break
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    cpu = meter.since_start()
    commands = sum(sent.values())
    rows = "\n".join(f"| {what} | {count} |" for what, count in sent.items())
    per = "\n".join(f"| {name} | {seconds * 1000 / commands:.2f} |"
                     for name, seconds in cpu.items())
    total = sum(cpu.values()) * 1000 / commands
    return f"""
Mixed workload: {n} payments ({", ".join(f"{share * 10}% {name}" for name, share in MIX)}),
{commands} commands, all at rest after {elapsed:.1f} s ({commands / elapsed:.0f} commands/s):

| command | sent |
|---|---|
{rows}

| process | CPU ms per command |
|---|---|
{per}
| **total** | **{total:.2f}** |
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="payments (default 2000)")
    parser.add_argument("-c", "--concurrency", type=int, default=50)
    parser.add_argument("--psp-latency", default="100-400", help="ms, LOW-HIGH")
    parser.add_argument("--relay", choices=("apart", "processor"), default="apart",
                        help="run the outbox relay as its own process (default) or inside "
                             "the processor")
    parser.add_argument("--mixed", type=int, default=1000, metavar="N",
                        help="payments in the mixed workload (create, confirm, capture, cancel, "
                             "refund) after the rest; 0 skips it (default 1000)")
    parser.add_argument("--no-deliver", action="store_true",
                        help="skip webhook delivery at fixed event rates (ops/bench_deliver.py)")
    args = parser.parse_args()
    asyncio.run(bench(Settings.from_env(), args.n, args.concurrency, args.psp_latency,
                      args.relay == "apart", args.mixed, not args.no_deliver))


if __name__ == "__main__":
    main()
