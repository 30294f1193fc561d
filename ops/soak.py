"""`make soak`: payonce under a steady load for a long time, to show that nothing grows.

Starts the same deployment as `make bench` (ops/bench.py) and sends POST /v1/payment_intents
with confirm=true at a fixed rate on a schedule (open loop: a slow answer does not slow the
senders), for `--minutes`. Every minute it prints the accept latency of that minute, the
answers that were not 202, how many payments are still unsettled, the CPU time of that minute
(every process, from /proc, as `make bench` reads it) per POST accepted, and the resident memory
(VmRSS) of each payonce process; at the end, the CPU per POST of each process over the whole
run, and whether accept p99 and each RSS stayed flat from the 5th minute on (the first minutes
warm caches and pools). Not in the test suite.

At a fixed rate below the full one, commands, results and events come a few at a time, so the
batches are small and a payment costs more CPU than under `make bench`, which keeps the
processes saturated.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import aiohttp

from ops.bench import BODY, CPUMeter, deployment
from ops.settings import Settings

WARM_UP_MINUTES = 5
# "Flat": the last minute within this factor of the first minute after the warm-up.
FLAT_RATIO = 1.5
# How often the CPU of every process is read: a PostgreSQL backend that a pool closes counts
# up to its last reading.
SAMPLE_S = 5.0


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _p(samples: list[float], q: int) -> float:
    if len(samples) < 2:
        return samples[0] * 1000 if samples else float("nan")
    return statistics.quantiles(samples, n=100)[q - 1] * 1000


async def soak(settings: Settings, rate: int, minutes: int, latency: str) -> None:
    async with deployment(settings, latency, relay_apart=True) as d:
        headers = {"Authorization": f"Bearer {d.account['secret_key']}"}
        rows: list[tuple[int, float, float, int, int, dict[str, float]]] = []
        connector = aiohttp.TCPConnector(limit=1000)
        async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
            latencies: list[float] = []
            failures = 0
            tasks: set[asyncio.Task[None]] = set()

            async def one() -> None:
                nonlocal failures
                started = time.perf_counter()
                try:
                    async with session.post(f"{d.base}/v1/payment_intents", data=BODY,
                                            headers={"Idempotency-Key": str(uuid.uuid4())}
                                            ) as resp:
                        await resp.read()
                        ok = resp.status == 202
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

            print(f"soak: {rate} POST/s for {minutes} min, PSP latency {latency} ms\n")
            print("| minute | accepted | accept p50 | accept p99 | not 202 | unsettled | "
                  "CPU per POST | " + " | ".join(f"{r} RSS" for r in d.roles) + " |")
            print("|---" * (7 + len(d.roles)) + "|", flush=True)
            meter = CPUMeter({role: d.pid(role) for role in d.roles})
            spent: dict[str, float] = {}
            accepted = 0
            begin = sampled = time.perf_counter()
            sent = 0
            for minute in range(1, minutes + 1):
                end = begin + minute * 60
                while (now := time.perf_counter()) < end:
                    if now - sampled >= SAMPLE_S:
                        meter.sample()
                        sampled = now
                    due = begin + sent / rate
                    if due > now:
                        await asyncio.sleep(due - now)
                    task = asyncio.create_task(one())
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
                taken, latencies = latencies, []
                failed, failures = failures, 0
                unsettled = await d.conn.fetchval(
                    "SELECT count(*) FROM payment_intents WHERE account_id = $1 "
                    "AND status <> 'succeeded'", d.account["account"])
                rss = {role: _rss_mb(d.pid(role)) for role in d.roles}
                total = meter.since_start()
                minute_cpu = sum(total.values()) - sum(spent.values())
                spent = total
                accepted += len(taken)
                row = (minute, _p(taken, 50), _p(taken, 99), failed, unsettled, rss)
                rows.append((len(taken), *row[1:3], failed, unsettled, rss))
                print(f"| {minute} | {len(taken)} | {row[1]:.1f} ms | {row[2]:.1f} ms | {failed} "
                      f"| {unsettled} | {minute_cpu * 1000 / max(1, len(taken)):.2f} ms | "
                      + " | ".join(f"{mb:.0f} MB" for mb in rss.values()) + " |", flush=True)
            await asyncio.gather(*tasks)
    print(f"\nCPU per POST accepted over the {minutes} min, each process: "
          + ", ".join(f"{name} {cpu * 1000 / max(1, accepted):.2f} ms"
                      for name, cpu in spent.items())
          + f"; total {sum(spent.values()) * 1000 / max(1, accepted):.2f} ms")
    if minutes > WARM_UP_MINUTES:
        first, last = rows[WARM_UP_MINUTES - 1], rows[-1]
        verdicts = [f"accept p99 {first[2]:.1f} → {last[2]:.1f} ms"
                    f" ({'flat' if last[2] <= first[2] * FLAT_RATIO else 'GREW'})"]
        for role in first[5]:
            a, b = first[5][role], last[5][role]
            verdicts.append(f"{role} RSS {a:.0f} → {b:.0f} MB"
                            f" ({'flat' if b <= a * FLAT_RATIO else 'GREW'})")
        print(f"\nfrom minute {WARM_UP_MINUTES} to {minutes}: " + "; ".join(verdicts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=100, help="POST per second (default 100)")
    parser.add_argument("--minutes", type=int, default=30, help="how long (default 30)")
    parser.add_argument("--psp-latency", default="100-400", help="ms, LOW-HIGH")
    args = parser.parse_args()
    asyncio.run(soak(Settings.from_env(), args.rate, args.minutes, args.psp_latency))


if __name__ == "__main__":
    main()
