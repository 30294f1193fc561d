"""Webhook delivery at fixed event rates: the relay and the dispatcher alone, without the
payment path, so the figures are the dispatcher's and not those of a machine already busy
settling payments.

Starts `payonce relay` and `payonce dispatcher` (in the test database, under a RabbitMQ prefix
of its own), with one endpoint on a receiver in this process that answers 200 at once, then
writes events to the outbox on a schedule, as the processor does for payments: each payment's
events in two groups (when it is confirmed, and when the PSP answers PSP_GAP_S later). It
measures the delivery lag (event committed → receiver got it) and the CPU per event of the
relay, the dispatcher, PostgreSQL and RabbitMQ, from /proc.

With `hanging`, a second endpoint of the account receives the same events on a receiver that
answers each request after HANG_S: the first receiver's figures should not move.

`make bench` runs it at RATES; `python -m ops.bench_deliver --rate 600 --hanging` runs one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Any

import asyncpg

from contracts.ids import random_id
from contracts.topology import Topology
from ops.accounts import create_account
from ops.bench import CPUMeter, Receiver, _free_port, _percentiles, _start, tear_down
from ops.migrate import migrate
from ops.postgres import _init
from ops.settings import Settings

# Events per second: the processor's full settle rate on 2 cores writes about 500.
RATES = (600, 900)
SECONDS = 20.0
PSP_GAP_S = 0.25
HANG_S = 10.0
TICK_S = 0.02
DRAIN_S = 60.0
# A payment's events, as the processor writes them: confirmed, then settled.
FIRST = ("payment_intent.created", "payment_intent.processing")
SECOND = ("charge.succeeded", "payment_intent.succeeded")
EVENTS_PER_PAYMENT = len(FIRST) + len(SECOND)
INSERT = """
INSERT INTO events (id, account_id, type, object_id, data, exchange)
SELECT e.id, $2, e.type, e.object_id, e.data, $3
FROM unnest($1::text[], $4::text[], $5::text[], $6::jsonb[]) AS e (id, type, object_id, data)
"""
ROLES = ("relay", "dispatcher")


def _object(object_id: str, status: str) -> dict[str, Any]:
    kind = "charge" if object_id.startswith("ch_") else "payment_intent"
    return {"id": object_id, "object": kind, "amount": 2000, "currency": "usd",
            "status": status, "livemode": False, "metadata": {}, "created": int(time.time())}


def _schedule(rate: float, seconds: float) -> list[tuple[float, list[tuple[Any, ...]]]]:
    """(when, events) of every payment's two groups, in time order, from 0."""
    due = []
    for i in range(int(rate / EVENTS_PER_PAYMENT * seconds)):
        at = i * EVENTS_PER_PAYMENT / rate
        intent, charge = random_id("pi"), random_id("ch")
        due.append((at, [(random_id("evt"), t, intent, _object(intent, "processing"))
                         for t in FIRST]))
        due.append((at + PSP_GAP_S, [
            (random_id("evt"), "charge.succeeded", charge, _object(charge, "succeeded")),
            (random_id("evt"), "payment_intent.succeeded", intent,
             _object(intent, "succeeded"))]))
    return sorted(due, key=lambda d: d[0])


async def deliver(settings: Settings, rate: float, hanging: bool,
                  seconds: float = SECONDS) -> str:
    """Events at `rate` per second for `seconds`: a Markdown table row of the figures."""
    db = settings.database_url.rsplit("/", 1)
    database_url = f"{db[0]}/{db[1]}_test"
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    await _init(conn)
    account = (await create_account(conn, "bench-deliver"))["account"]
    topology = Topology(f"payonce_bench.{uuid.uuid4().hex[:6]}", settings.partitions)
    fast = Receiver()
    runners = []
    for receiver in (fast, Receiver(HANG_S)) if hanging else (fast,):
        runner, port = await receiver.start()
        runners.append(runner)
        await conn.execute(
            "INSERT INTO webhook_endpoints (id, account_id, url, enabled_events) "
            "VALUES ($1, $2, $3, $4)", random_id("we"), account, f"http://127.0.0.1:{port}/",
            ["*"])
    env = {**os.environ, "PAYONCE_DATABASE_URL": database_url,
           "PAYONCE_AMQP_PREFIX": topology.prefix, "PAYONCE_SECRET": "bench-secret",
           "PAYONCE_DISPATCHER_METRICS_PORT": str(_free_port()),
           "PAYONCE_RELAY_METRICS_PORT": str(_free_port()),
           "PAYONCE_WEBHOOK_ALLOW_PRIVATE": "true", "PAYONCE_LOG_LEVEL": "WARNING"}
    procs = _start(env, ROLES)
    try:
        await asyncio.sleep(3.0)  # both connected and consuming
        meter = CPUMeter({role: proc.pid for role, proc in zip(ROLES, procs, strict=True)})
        due = _schedule(rate, seconds)
        begin = time.monotonic()
        written = 0
        while written < len(due):
            now = time.monotonic() - begin
            batch = []
            while written < len(due) and due[written][0] <= now:
                batch.extend(due[written][1])
                written += 1
            if batch:
                await conn.execute(INSERT, [r[0] for r in batch], account, topology.events,
                                   [r[1] for r in batch], [r[2] for r in batch],
                                   [r[3] for r in batch])
                await conn.execute("SELECT pg_notify('payonce_events', '')")
            await asyncio.sleep(TICK_S)
        events = {r["id"]: r["created"].timestamp() for r in await conn.fetch(
            "SELECT id, created FROM events WHERE account_id = $1", account)}
        deadline = time.monotonic() + DRAIN_S
        while len(fast.first_seen.keys() & events.keys()) < len(events):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        cpu = meter.since_start()
    finally:
        await tear_down(settings, topology, procs, conn, runners)
    lags = [t - events[i] for i, t in fast.first_seen.items() if i in events]
    got = max(len(lags), 1)
    per_event = [cpu[name] * 1000 / got for name in ("relay", "dispatcher", "PostgreSQL",
                                                     "RabbitMQ")]
    label = f"{rate:.0f}/s" + (f", and one endpoint answering after {HANG_S:.0f} s"
                              if hanging else "")
    return (f"| {label} | {len(lags)} of {len(events)} | {_percentiles(lags)} | "
            + " | ".join(f"{ms:.2f}" for ms in per_event) + f" | {sum(per_event):.2f} |")


async def table(settings: Settings) -> str:
    rows = [await deliver(settings, rate, hanging=False) for rate in RATES]
    rows.append(await deliver(settings, RATES[0], hanging=True))
    return f"""
Webhooks at fixed event rates, the relay and the dispatcher alone ({SECONDS:.0f} s each; a
payment's events in two groups {PSP_GAP_S} s apart; lag from the event's commit to the
receiver; CPU ms per event delivered to the receiver that answers at once):

| events offered | delivered | lag | relay | dispatcher | PostgreSQL | RabbitMQ | total |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=RATES[0], help="events per second")
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--hanging", action="store_true",
                        help=f"a second endpoint answering after {HANG_S:.0f} s")
    args = parser.parse_args()
    print(asyncio.run(deliver(Settings.from_env(), args.rate, args.hanging, args.seconds)))


if __name__ == "__main__":
    main()
