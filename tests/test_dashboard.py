"""The Grafana dashboard shows what payonce exports: a real Prometheus scrapes a real stack
(edge, processor, relay and dispatcher processes, and RabbitMQ's plugin) that has just processed
payments and delivered their webhooks, and every expression of every panel parses and
returns data, and names only metrics some process exports."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from contracts import ids
from ops.dashboard import expressions, render
from tests.conftest import Client, Proc, free_port, make_settings, settings_env, stack, start_proc
from tests.support import DECLINED, VISA, create, wait_settled

COMMITTED = Path(__file__).resolve().parent.parent / "ops" / "grafana" / "dashboards" / \
    "payonce.json"
# PromQL words that look like metric names in an expression.
PROMQL = {"sum", "rate", "max", "by", "or", "vector", "histogram_quantile", "time", "le",
          "and", "without", "min", "avg", "count", "clamp_min", "increase"}
RABBITMQ_METRICS = "http://127.0.0.1:15692"


def test_committed_dashboard_is_the_generated_one() -> None:
    assert COMMITTED.read_bytes() == render(), (
        "regenerate: payonce dashboard > ops/grafana/dashboards/payonce.json")


def metric_names(expression: str) -> set[str]:
    # Label values and legends are in quotes; durations in brackets.
    bare = re.sub(r'"[^"]*"|\[[^\]]*\]', "", expression)
    return {name for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
            if name not in PROMQL and not name.startswith(("method", "status", "command",
                                                           "outcome", "route", "loop",
                                                           "queue", "job", "result",
                                                           "where", "dependency", "instance"))}


@asynccontextmanager
async def prometheus(targets: dict[str, str], tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    jobs = "\n".join(
        f"  - job_name: {job}\n"
        + (("    metrics_path: /metrics/detailed\n    params:\n      family: "
            "[queue_coarse_metrics, queue_consumer_count]\n") if job == "rabbitmq" else "")
        + f"    static_configs:\n      - targets: ['{target}']"
        for job, target in targets.items())
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n{jobs}\n")
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 (returns at once; the server runs on)
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def query(session: aiohttp.ClientSession, base: str, expr: str) -> list[Any]:
    async with session.get(f"{base}/api/v1/query", params={"query": expr}) as resp:
        body = await resp.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]  # type: ignore[no-any-return]


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus missing: `bash ops/services.sh tools prometheus`")
async def test_every_panel_returns_data_from_a_real_stack(
    migrated: None, procs: list[Proc], tmp_path: Path
) -> None:
    # As docker-compose.yml runs it: the relay in a process of its own.
    settings = make_settings(edge_port=free_port(), processor_metrics_port=free_port(),
                             dispatcher_metrics_port=free_port(), relay_metrics_port=free_port(),
                             processor_relay=False)
    received: list[str] = []

    async def receiver(request: web.Request) -> web.Response:
        received.append(request.headers["webhook-id"])
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", receiver)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    try:
        async with stack(settings, processor=False, edge=False) as s:
            await start_proc("edge", settings, procs, tmp_path)
            await start_proc("processor", settings, procs, tmp_path)
            await start_proc("relay", settings, procs, tmp_path)
            dispatcher = Proc(["dispatcher"], settings_env(settings),
                              tmp_path / "dispatcher.log").start()
            procs.append(dispatcher)
            local = await s.client()
            api = Client(s.session, f"http://127.0.0.1:{settings.edge_port}", {
                "account": local.account_id, "secret_key": local.secret_key,
                "publishable_key": local.publishable_key}, s.db)
            endpoint = await api.post("/v1/webhook_endpoints", {
                "url": f"http://127.0.0.1:{hook_port}/hook", "enabled_events[0]": "*"})
            assert endpoint.status == 200, endpoint.body
            targets = {"payonce-edge": f"127.0.0.1:{settings.edge_port}",
                       "payonce-processor": f"127.0.0.1:{settings.processor_metrics_port}",
                       "payonce-dispatcher": f"127.0.0.1:{settings.dispatcher_metrics_port}",
                       "payonce-relay": f"127.0.0.1:{settings.relay_metrics_port}",
                       "rabbitmq": RABBITMQ_METRICS.removeprefix("http://")}
            async with prometheus(targets, tmp_path) as base, aiohttp.ClientSession() as session:
                cards = [DECLINED if i % 4 == 0 else VISA for i in range(24)]
                made = await asyncio.gather(*(
                    create(api, 1000 + i, card, confirm_separately=i % 3 == 0)
                    for i, card in enumerate(cards)))
                await wait_settled(s.db, api.account_id, len(made))
                # A few replays and a bad request, so idempotency and 4xx series exist too.
                key = str(uuid.uuid4())
                for _ in range(2):
                    await api.post("/v1/payment_intents",
                                   {"amount": "1000", "currency": "usd"}, key=key)
                await api.get(f"/v1/payment_intents/{ids.random_id('pi')}")
                async with asyncio.timeout(60):
                    while len(received) < 4 * len(made):
                        await asyncio.sleep(0.2)
                    # Every target up and scraped three times since the payments: a rate
                    # needs two samples of a series.
                    while len(await query(session, base, "count_over_time(up[4s]) >= 3")
                              ) < len(targets) or len(await query(session, base, "up == 1")
                                                      ) < len(targets):
                        await asyncio.sleep(0.5)
                names = set(await names_scraped(session, base))
                empty = [expr for expr in expressions() if not await query(session, base, expr)]
                unknown = {name for expr in expressions() for name in metric_names(expr) - names}
                assert not empty, f"expressions without data: {empty}"
                assert not unknown, f"metrics no process exports: {sorted(unknown)}"
    finally:
        await runner.cleanup()


async def names_scraped(session: aiohttp.ClientSession, base: str) -> list[str]:
    async with session.get(f"{base}/api/v1/label/__name__/values") as resp:
        body = await resp.json()
    return body["data"]  # type: ignore[no-any-return]
