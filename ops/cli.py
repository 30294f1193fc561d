"""`payonce`: the one command line of the project."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
from aiohttp import web

from contracts.topology import TopologyMismatch
from edge.app import create_app
from ops import dashboard, definitions, logs, memory, trace, workers
from ops.accounts import create_account
from ops.deadletters import list_dead, replay_dead
from ops.listen import Listener, ListenError, listen
from ops.migrate import migrate
from ops.settings import Settings, SettingsError
from processor.app import Processor
from processor.dispatcher import Dispatcher
from processor.outbox import RelayService

log = logging.getLogger("payonce")

# In-flight HTTP requests get this long to finish when the edge is stopped.
EDGE_SHUTDOWN_S = 15.0


async def serve(settings: Settings, *, edge: bool, processor: bool,
                dispatcher: bool = False, relay: bool = False) -> None:
    """Run the edge, the processor, the webhook dispatcher and/or the outbox relay until
    SIGINT or SIGTERM, then stop gracefully: the edge stops accepting and finishes its
    requests, the processor finishes its commands, the dispatcher its delivery attempts, the
    relay its batch of events."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    worker = Processor(settings) if processor else None
    sender = Dispatcher(settings) if dispatcher else None
    relayer = RelayService(settings) if relay else None
    runner: web.AppRunner | None = None
    if relayer is not None:
        await relayer.start()
    if worker is not None:
        await worker.start()
    if sender is not None:
        await sender.start()
    if edge:
        runner = web.AppRunner(create_app(settings), access_log=None,
                               shutdown_timeout=EDGE_SHUTDOWN_S)
        await runner.setup()
        await web.TCPSite(runner, settings.edge_host, settings.edge_port,
                          reuse_port=settings.edge_reuse_port or None).start()
        log.info("edge listening", extra={"ids": {"port": settings.edge_port}})
    await stop.wait()
    log.info("stopping")
    if runner is not None:
        await runner.cleanup()
    if worker is not None:
        await worker.stop()
    if sender is not None:
        await sender.stop()
    if relayer is not None:
        await relayer.stop()


async def _create_account(settings: Settings, name: str) -> dict[str, str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await create_account(conn, name)
    finally:
        await conn.close()


async def _account_exists(settings: Settings, account_id: str) -> bool:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id))
    finally:
        await conn.close()


def _dev_state(path: Path) -> dict[str, Any]:
    return orjson.loads(path.read_bytes()) if path.exists() else {}


def _save_dev_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))


async def dev(settings: Settings, state_file: Path) -> None:
    """Everything in one process for a developer: migrations, a dev account (made once and
    kept in a git-ignored file, since the database only keeps its key's digest), edge,
    processor and webhook dispatcher. Webhooks may go to private addresses, so that
    `payonce listen` and receivers on this machine get them."""
    state = _dev_state(state_file)
    if not settings.secret:
        state.setdefault("secret", secrets.token_urlsafe(32))
        settings = settings.with_(secret=state["secret"])
    settings = settings.with_(webhook_allow_private=True)
    await migrate(settings.database_url)
    account = state.get("account")
    if not account or not await _account_exists(settings, account["account"]):
        account = await _create_account(settings, "dev")
        state["account"] = account
    _save_dev_state(state_file, state)
    base = f"http://127.0.0.1:{settings.edge_port}"
    print(f"""
payonce is starting: edge on {base}, processor with {settings.partitions} partitions,
webhook dispatcher (metrics on :{settings.dispatcher_metrics_port}).
Webhooks may be delivered to private and loopback addresses (PAYONCE_WEBHOOK_ALLOW_PRIVATE is
on in dev): never run dev like this where merchants can create endpoints.
Dev account {account["account"]} (kept in {state_file})
  secret key:       {account["secret_key"]}
  publishable key:  {account["publishable_key"]}

Try it:
  curl -s {base}/v1/payment_intents -u {account["secret_key"]}: \\
    -H "Idempotency-Key: $(date +%s%N)" \\
    -d amount=2000 -d currency=usd -d payment_method=pm_card_visa -d confirm=true

Webhooks to a local URL, in another terminal:
  payonce listen --forward-to http://localhost:4242/webhook

Ctrl-C stops it.
""", flush=True)
    await serve(settings, edge=True, processor=True, dispatcher=True)


def _listen(settings: Settings, args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get("PAYONCE_API_KEY")
    if not api_key:
        account = _dev_state(args.state_file).get("account")
        if not account:
            print(f"payonce listen: no --api-key, no PAYONCE_API_KEY and no dev account in "
                  f"{args.state_file} (run `payonce dev` first)", file=sys.stderr)
            return 2
        api_key = account["secret_key"]
    events = [e.strip() for e in args.events.split(",") if e.strip()] or ["*"]
    listener = Listener(
        forward_to=args.forward_to, api_key=api_key,
        api_base=args.api_base or f"http://127.0.0.1:{settings.edge_port}", events=events,
        forward_timeout_s=max(1.0, settings.webhook_timeout_s - 1.0))
    try:
        asyncio.run(listen(listener))
    except ListenError as exc:
        print(f"payonce listen: could not create the webhook endpoint: {exc}\n"
              "A local address needs PAYONCE_WEBHOOK_ALLOW_PRIVATE=true on the edge and the "
              "dispatcher (`payonce dev` sets it).", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="payonce",
        description="payonce: an asynchronous, Stripe-compatible PaymentIntents API. "
                    "Configured from PAYONCE_* environment variables (see README).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    edge = sub.add_parser("edge", help="run the HTTP edge")
    edge.add_argument("--port", type=int, help="listen port (default PAYONCE_EDGE_PORT, 8080)")
    edge.add_argument("--host", help="listen address (default PAYONCE_EDGE_HOST, 0.0.0.0)")
    edge.add_argument("--workers", type=int,
                      help="edge processes sharing the port (default PAYONCE_EDGE_WORKERS, 1)")
    processor = sub.add_parser("processor",
                               help="run the processor (consumers, PSP attempts, outbox)")
    processor.add_argument("--workers", type=int,
                           help="processor processes sharing the partitions (default "
                                "PAYONCE_PROCESSOR_WORKERS, 1)")
    sub.add_parser("dispatcher", help="run the webhook dispatcher (deliveries and retries)")
    sub.add_parser("relay", help="run the outbox relay alone (with PAYONCE_PROCESSOR_RELAY="
                                 "false on the processors)")
    sub.add_parser("migrate", help="apply database migrations")
    account = sub.add_parser("account", help="manage accounts")
    account_sub = account.add_subparsers(dest="account_command", required=True, metavar="ACTION")
    create = account_sub.add_parser("create", help="create an account and print its API keys")
    create.add_argument("--name", required=True, help="a name for the account")
    dev_parser = sub.add_parser(
        "dev", help="migrate, make a dev account once, run edge, processor and dispatcher")
    dev_parser.add_argument("--state-file", type=Path, default=Path(".data/dev.json"),
                            help="where the dev account and secret are kept")
    listen_parser = sub.add_parser(
        "listen", help="forward the account's webhooks to a local URL (as `stripe listen`)")
    listen_parser.add_argument("--forward-to", required=True, metavar="URL",
                               help="where to POST each event, e.g. "
                                    "http://localhost:4242/webhook")
    listen_parser.add_argument("--events", default="*",
                               help="event types to receive, comma-separated (default: *)")
    listen_parser.add_argument("--api-key", help="the account's secret key (default: "
                                                 "PAYONCE_API_KEY, else the dev account's)")
    listen_parser.add_argument("--api-base", metavar="URL",
                               help="the edge (default: http://127.0.0.1:PAYONCE_EDGE_PORT)")
    listen_parser.add_argument("--state-file", type=Path, default=Path(".data/dev.json"),
                               help="where `payonce dev` keeps the dev account")
    dead = sub.add_parser("dead", help="list or replay dead-lettered commands")
    dead_sub = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")
    dead_list = dead_sub.add_parser("list", help="print dead-lettered messages as JSON lines")
    dead_list.add_argument("--limit", type=int, default=100)
    dead_replay = dead_sub.add_parser(
        "replay", help="publish dead-lettered messages again to where they came from")
    which = dead_replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="replay every message")
    which.add_argument("message_ids", nargs="*", default=[], metavar="MESSAGE_ID")
    topology = sub.add_parser("topology", help="RabbitMQ topology as a definitions file")
    topology_sub = topology.add_subparsers(dest="topology_command", required=True,
                                           metavar="ACTION")
    topology_sub.add_parser(
        "definitions", help="print the deployment's exchanges, queues and bindings as a "
                            "RabbitMQ definitions file (ops/rabbitmq/definitions.json)")
    sub.add_parser("dashboard", help="print the Grafana dashboard "
                                     "(ops/grafana/dashboards/payonce.json)")
    trace_parser = sub.add_parser(
        "trace", help="a payment's life in order: commands, transitions, PSP calls, events, "
                      "webhook deliveries")
    trace_parser.add_argument("intent_id", metavar="pi_…")
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
        if getattr(args, "port", None):
            settings = settings.with_(edge_port=args.port)
        if getattr(args, "host", None):
            settings = settings.with_(edge_host=args.host)
        if getattr(args, "workers", None) is not None:
            workers_of = "edge_workers" if args.command == "edge" else "processor_workers"
            settings = settings.with_(**{workers_of: args.workers})
        # A developer at a terminal reads text; everything else gets JSON lines.
        human = args.command in ("dev", "listen") and "PAYONCE_LOG_FORMAT" not in os.environ
        logs.setup("text" if human else settings.log_format, settings.log_level)
        if args.command in ("edge", "processor", "dispatcher", "relay", "dev"):
            memory.fix_malloc_thresholds()
        if args.command == "edge" and settings.edge_workers > 1:
            settings.secret_bytes  # noqa: B018  (a clear error before anything starts)
            passed = [a for flag, value in (("--host", args.host), ("--port", args.port))
                      if value for a in (flag, str(value))]
            return workers.supervise(settings.edge_workers, passed)
        # `--workers N` starts N workers here, and so does PAYONCE_PROCESSOR_WORKERS unless
        # PAYONCE_PROCESSOR_WORKER says which one of them this process is.
        if args.command == "processor" and settings.processor_workers > 1 and (
                args.workers is not None or not os.environ.get("PAYONCE_PROCESSOR_WORKER")):
            settings.secret_bytes  # noqa: B018  (a clear error before anything starts)
            return workers.supervise(settings.processor_workers, [], "processor")
        if args.command in ("edge", "processor", "dispatcher", "relay"):
            settings.secret_bytes  # noqa: B018  (a clear error before anything starts)
            asyncio.run(serve(settings, edge=args.command == "edge",
                              processor=args.command == "processor",
                              dispatcher=args.command == "dispatcher",
                              relay=args.command == "relay"))
        elif args.command == "listen":
            return _listen(settings, args)
        elif args.command == "migrate":
            applied = asyncio.run(migrate(settings.database_url))
            print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")
        elif args.command == "account":
            print(orjson.dumps(asyncio.run(_create_account(settings, args.name))).decode())
        elif args.command == "dead" and args.dead_command == "list":
            for entry in asyncio.run(list_dead(settings, args.limit)):
                print(orjson.dumps(entry).decode())
        elif args.command == "dead":
            ids = None if args.all else args.message_ids
            replayed = asyncio.run(replay_dead(settings, ids))
            print(f"replayed {len(replayed)} message(s)")
        elif args.command == "dev":
            asyncio.run(dev(settings, args.state_file))
        elif args.command == "topology":
            sys.stdout.buffer.write(definitions.render(settings))
        elif args.command == "dashboard":
            sys.stdout.buffer.write(dashboard.render())
        elif args.command == "trace":
            steps = asyncio.run(trace.trace(settings.database_url, args.intent_id,
                                            timeout_s=settings.db_timeout_s))
            if not steps:
                print(f"payonce trace: nothing is known of {args.intent_id}", file=sys.stderr)
                return 1
            sys.stdout.write(trace.render(steps))
    except SettingsError as exc:
        print(f"payonce: configuration error: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError, aio_pika.exceptions.AMQPError,
            TopologyMismatch) as exc:
        print(f"payonce: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
