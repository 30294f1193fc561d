"""Private PostgreSQL, Redis and RabbitMQ for fault-injection tests, which stop, kill, pause and
restart them under load.

The machine's shared servers (5432, 6379, 5672) serve the rest of the suite, CI and benchmarks,
so these tests never signal them. `PrivateServices.start()` has ops/services.sh start a server
of each kind from the OS packages (PAYONCE_SERVICES_VIA=packages: a container's processes could
not be paused or killed one by one) on free ports, with PAYONCE_DATA_DIR a fresh folder under
/tmp (Unix socket paths are limited to 107 bytes). Every control finds its target through that
folder: the pid files the servers write there, the node name services.sh derives from the
private AMQP port, and, for the last sweep, the processes whose working directory lies inside
it. No control looks a process up by its name.

Each control returns only once the server is in the state it asked for (up and answering, or
down); if the server does not get there within a bounded wait it raises ServiceStateError with
the tail of the server's log.

A test module imports the fixture (`from tests.private import private_services_fixture  # noqa:
F401`) and its tests take a `private_services` argument. The fixture starts the three servers on
first use and, at the end of the session, stops them and removes the folder, whatever state the
tests left them in: a paused Postgres is continued first, whatever outlives `services.sh stop` is
killed. A run that was itself killed leaves its folder behind; the next start stops what such a
folder still runs and removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ops.migrate import migrate
from ops.settings import Settings
from tests.conftest import make_settings

log = logging.getLogger(__name__)

SERVICES_SH = Path(__file__).resolve().parent.parent / "ops" / "services.sh"
# The folder of a run that may have been killed; see `reap_stale`.
MARKER = "private-services.json"
USER = PASSWORD = "payonce"
# services.sh makes <db> and <db>_test; the tests use <db>_test, as make_settings() does.
BASE_DATABASE = "payonce"
DATABASE = f"{BASE_DATABASE}_test"
# make_settings() moves tests to the next Redis database; these URLs do the same.
REDIS_DB = 1

# services.sh waits up to 60 s for each server it starts, then fails with the log's tail;
# waiting longer here lets that message through instead of a bare timeout of ours.
SCRIPT_S = 90.0
# A server asked to stop, die, pause or answer again gets there in well under a second here;
# the margin is for a loaded 2-core machine.
STATE_S = 30.0
POLL_S = 0.1
# One probe of a server that does not answer (paused, booting) gives up after this long.
PROBE_S = 1.0
# RabbitMQ's own default; services.sh's config does not change it.
DEFAULT_WATERMARK = "0.4"
# /proc states of a process stopped by a signal (or by a tracer).
STOPPED = ("T", "t")
# The ports services.sh tries for a broker's management UI; a private port is never one of them.
MANAGEMENT_PORTS = range(15672, 15772)


class ServiceStateError(RuntimeError):
    """A private server did not reach the state a control asked for in time."""


class PrivateServices:
    """A private PostgreSQL, Redis and RabbitMQ, and the controls that fault-injection tests
    use on them. Start it with `await PrivateServices.start()`, end it with `await stop()`."""

    def __init__(self, data_dir: Path, pg_port: int, redis_port: int, amqp_port: int) -> None:
        self.data_dir = data_dir
        self.pg_port = pg_port
        self.redis_port = redis_port
        self.amqp_port = amqp_port
        self.database = DATABASE
        self.node = f"payonce-{amqp_port}@localhost"  # as services.sh names it
        # The processes pause_postgres stopped, so resume continues exactly those.
        self._paused: list[int] = []

    # --- life cycle ------------------------------------------------------------------------

    @classmethod
    async def start(cls) -> PrivateServices:
        """Start the three servers on free ports in a fresh folder, and migrate the database."""
        await reap_stale()
        services = cls(_new_folder(), *pick_ports())
        services._write_marker()
        started = time.monotonic()
        try:
            await services._script("up", within_s=3 * SCRIPT_S)
            await migrate(services.database_url)
        except BaseException:
            try:
                await services.stop()
            except ServiceStateError:
                # The error that stopped the start is the one raised; this one is logged.
                log.exception("private services: cleaning up after a failed start failed")
            raise
        log.info("private services up in %.1f s: postgres %d, redis %d, rabbitmq %d (%s)",
                 time.monotonic() - started, services.pg_port, services.redis_port,
                 services.amqp_port, services.data_dir)
        return services

    def _write_marker(self) -> None:
        """Who started the servers in the folder, on which ports: what reap_stale reads."""
        (self.data_dir / MARKER).write_text(json.dumps({
            "owner_pid": os.getpid(), "pg_port": self.pg_port, "redis_port": self.redis_port,
            "amqp_port": self.amqp_port}))

    @classmethod
    def _from_marker(cls, marker: Path) -> tuple[int, PrivateServices] | None:
        try:
            owner = json.loads(marker.read_text())
            services = cls(marker.parent, int(owner["pg_port"]), int(owner["redis_port"]),
                           int(owner["amqp_port"]))
            return int(owner["owner_pid"]), services
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def stop(self) -> None:
        """Stop all three, whatever state they are in, and remove the folder."""
        # A stopped process acts on no signal but SIGKILL until it is continued.
        for pid in self.processes():
            _signal(pid, signal.SIGCONT)
        self._paused = []
        failure: ServiceStateError | None = None
        if self.data_dir.exists():
            try:
                await self._script("stop", within_s=3 * SCRIPT_S)
            except ServiceStateError as exc:
                failure = exc
        for pid in self.processes():
            log.warning("private services: killing pid %d left in %s", pid, self.data_dir)
            _signal(pid, signal.SIGKILL)
        try:
            await self._until("private processes gone", lambda: not self.processes(), [])
        finally:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if failure is not None:
            raise failure

    async def heal(self) -> None:
        """Bring all three back up and answering, with no memory alarm: for the start or the
        end of a test that may have left one of them down."""
        if self._paused or self._stopped_pids():
            await self.resume_postgres()
        if self._postmaster() is None:
            await self.start_postgres()
        if self._redis_pid() is None:
            await self.start_redis()
        if self._beam_pid() is None:
            await self.start_rabbitmq()
        elif not await self.rabbitmq_answers():
            await self.rabbitmq_start_app()
        await self._until("postgres answering", self.postgres_answers, self._pg_logs())
        await self._until("redis answering", self.redis_answers, self._redis_logs())
        await self._until("rabbitmq answering", self.rabbitmq_answers, self._rabbit_logs())
        # Asked of the node rather than remembered: start_app and a restart reset the watermark.
        if await self.memory_alarm_on():
            await self.memory_alarm(False)

    def processes(self) -> list[int]:
        """Every live process working in the folder: what the private servers run, and only
        that (each server works in its own subfolder)."""
        root = str(self.data_dir.resolve())
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                cwd = os.readlink(f"/proc/{entry.name}/cwd")
            except OSError:
                continue
            if (cwd == root or cwd.startswith(root + "/")) and _state(int(entry.name)) not in (
                    None, "Z"):
                found.append(int(entry.name))
        return found

    # --- what the tests connect to --------------------------------------------------------

    @property
    def database_url(self) -> str:
        """The migrated test database, to use as it is (make_settings takes it verbatim)."""
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.pg_port}/{self.database}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/{REDIS_DB}"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    def overrides(self) -> dict[str, str]:
        """The URLs as make_settings() overrides."""
        return {"database_url": self.database_url, "redis_url": self.redis_url,
                "amqp_url": self.amqp_url}

    def settings(self, **overrides: Any) -> Settings:
        """Test settings (tests.conftest.make_settings) on the private servers."""
        return make_settings(**{**self.overrides(), **overrides})

    # --- PostgreSQL -------------------------------------------------------------------------

    async def restart_postgres_immediate(self) -> None:
        """pg_ctl restart -m immediate: every backend dies without a checkpoint and the server
        starts again with crash recovery; returns once it answers."""
        await self._unpause()
        pg_ctl = str(_pg_bindir() / "pg_ctl")
        # No -o: pg_ctl restart reuses the options of the last start (postmaster.opts).
        await self._run(_as_user("postgres", [
            pg_ctl, "-D", str(self.data_dir / "postgres"), "-l", str(self._pg_logs()[0]),
            "-m", "immediate", "-w", "-t", str(int(SCRIPT_S)), "restart"]),
            what="pg_ctl restart -m immediate", logs=self._pg_logs())
        await self._until("postgres answering", self.postgres_answers, self._pg_logs())
        log.info("private postgres restarted (immediate)")

    async def stop_postgres(self) -> None:
        """A fast shutdown (clients disconnected); returns once the postmaster is gone and the
        port refuses connections."""
        await self._unpause()
        await self._script("stop", "postgres", logs=self._pg_logs())
        await self._until("postgres stopped", self._postgres_down, self._pg_logs())
        log.info("private postgres stopped")

    async def start_postgres(self) -> None:
        """Start it again on the same port and data; returns once it answers."""
        await self._unpause()
        await self._script("up", "postgres", logs=self._pg_logs())
        await self._until("postgres answering", self.postgres_answers, self._pg_logs())
        log.info("private postgres started")

    async def pause_postgres(self) -> None:
        """SIGSTOP the postmaster and all its children: connections stay open and new ones are
        accepted by the kernel, but nothing answers. Returns once every one of them is stopped."""
        postmaster = self._require(self._postmaster(), "postgres", self._pg_logs())
        _signal(postmaster, signal.SIGSTOP)
        # Only a running postmaster forks; once it is stopped the list of children is complete.
        self._paused = [postmaster]
        await self._until("postmaster stopped", lambda: _state(postmaster) in STOPPED,
                          self._pg_logs())
        children = _children(postmaster)
        for pid in children:
            _signal(pid, signal.SIGSTOP)
        self._paused.extend(children)
        # A child that exits meanwhile (a backend whose client left) answers nothing either.
        await self._until("postgres paused",
                          lambda: all(_state(pid) in (*STOPPED, "Z", None) for pid in children),
                          self._pg_logs())
        log.info("private postgres paused (%d processes)", len(self._paused))

    async def resume_postgres(self) -> None:
        """SIGCONT what pause_postgres stopped; returns once the server answers."""
        await self._unpause()
        await self._until("postgres answering", self.postgres_answers, self._pg_logs())
        log.info("private postgres resumed")

    async def postgres_answers(self) -> bool:
        """A login to the test database and a query succeed."""
        try:
            conn = await asyncpg.connect(self.database_url, timeout=PROBE_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        try:
            return bool(await conn.fetchval("SELECT 1", timeout=PROBE_S) == 1)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        finally:
            conn.terminate()

    # --- Redis ------------------------------------------------------------------------------

    async def flush_redis(self) -> None:
        """FLUSHALL; returns once a key written just before it is gone (clients under load
        write new keys at once, so the keyspace itself need not be empty)."""
        client = self._redis(socket_timeout=STATE_S)
        sentinel = f"private-services:sentinel:{random.getrandbits(64)}"
        try:
            await client.set(sentinel, b"1")
            await client.flushall()
            if await client.exists(sentinel):
                raise ServiceStateError("redis still holds keys after FLUSHALL")
        finally:
            await client.aclose()
        log.info("private redis flushed")

    async def kill_redis(self) -> None:
        """SIGKILL; returns once the process is gone and the port refuses connections."""
        pid = self._require(self._redis_pid(), "redis", self._redis_logs())
        _signal(pid, signal.SIGKILL)
        await self._until("redis killed", lambda: self._gone(pid, self.redis_port),
                          self._redis_logs())
        log.info("private redis killed (pid %d)", pid)

    async def start_redis(self) -> None:
        """Start it on the same port; it persists nothing, so it starts empty. Returns once it
        answers PING."""
        await self._script("up", "redis", logs=self._redis_logs())
        await self._until("redis answering", self.redis_answers, self._redis_logs())
        log.info("private redis started")

    async def restart_redis(self) -> None:
        """kill_redis, then start_redis: every key is lost."""
        await self.kill_redis()
        await self.start_redis()

    async def redis_answers(self) -> bool:
        client = self._redis(socket_connect_timeout=PROBE_S, socket_timeout=PROBE_S)
        try:
            return bool(await client.ping())
        except (OSError, redis.exceptions.RedisError):
            return False
        finally:
            await client.aclose()

    def _redis(self, **options: Any) -> aioredis.Redis:
        # redis-py retries a failed connection three times with backoff (3.5 s in all); a
        # control must see the server's state at once.
        return aioredis.Redis(host="127.0.0.1", port=self.redis_port,
                              retry=Retry(NoBackoff(), 0), **options)

    # --- RabbitMQ ---------------------------------------------------------------------------

    async def rabbitmq_stop_app(self) -> None:
        """rabbitmqctl stop_app: the node lives on, but the broker (listeners, queues) stops;
        returns once AMQP connections are refused."""
        await self._script("rabbitmqctl", "stop_app", logs=self._rabbit_logs())
        await self._until("rabbitmq app stopped", self._app_stopped, self._rabbit_logs())
        log.info("private rabbitmq app stopped")

    async def rabbitmq_start_app(self) -> None:
        """rabbitmqctl start_app; returns once an AMQP connection opens and every quorum queue
        has a leader."""
        await self._script("rabbitmqctl", "start_app", logs=self._rabbit_logs())
        await self._until("rabbitmq answering", self.rabbitmq_answers, self._rabbit_logs())
        await self._quorum_leaders()
        log.info("private rabbitmq app started")

    async def kill_rabbitmq(self) -> None:
        """SIGKILL the node (beam.smp); returns once it is gone and the port refuses."""
        pid = self._require(self._beam_pid(), "rabbitmq", self._rabbit_logs())
        _signal(pid, signal.SIGKILL)
        await self._until("rabbitmq killed", lambda: self._gone(pid, self.amqp_port),
                          self._rabbit_logs())
        log.info("private rabbitmq killed (pid %d)", pid)

    async def start_rabbitmq(self) -> None:
        """Start the node again on the same port and data: durable queues and their messages
        are back. Returns once an AMQP connection opens."""
        await self._script("up", "rabbitmq", logs=self._rabbit_logs())
        await self._until("rabbitmq answering", self.rabbitmq_answers, self._rabbit_logs())
        await self._quorum_leaders()
        log.info("private rabbitmq started")

    async def _quorum_leaders(self) -> None:
        """Wait until every quorum queue has a leader again. A single node restarted after
        kill -9 sometimes leaves one without a leader for good (RabbitMQ 3.x,
        rabbitmq-server#10070): an election is then triggered for it, as that issue advises,
        so the tests see the broker as an operator would leave it, not a RabbitMQ bug."""
        deadline = time.monotonic() + STATE_S
        waited = time.monotonic()
        while True:
            out = await self._run(
                [*self._script_argv(), "rabbitmqctl", "-q", "list_queues", "name", "type",
                 "leader", "--formatter", "json"], what="rabbitmqctl list_queues",
                logs=self._rabbit_logs(), capture=True)
            leaderless = [q["name"] for q in json.loads(out or "[]") if q.get("type") == "quorum"
                          and q.get("leader") in (None, "", "undefined")]
            if not leaderless:
                return
            if time.monotonic() > deadline:
                raise ServiceStateError(f"quorum queues without a leader: {leaderless[:5]}")
            # Elections normally finish within seconds of a start; only then nudge them.
            if time.monotonic() - waited > 5:
                for name in leaderless:
                    log.warning("private rabbitmq: triggering an election for %s", name)
                    await self._script(
                        "rabbitmqctl", "eval", f"ra:trigger_election({{'%2F_{name}', node()}}).",
                        logs=self._rabbit_logs())
            await asyncio.sleep(POLL_S * 5)

    async def restart_rabbitmq(self) -> None:
        """kill_rabbitmq, then start_rabbitmq."""
        await self.kill_rabbitmq()
        await self.start_rabbitmq()

    async def memory_alarm(self, on: bool) -> None:
        """Raise the memory alarm (a 1-byte watermark), so publishing connections are blocked
        and their frames held, or clear it (RabbitMQ's default watermark). Returns once the
        node reports the alarm in that state."""
        if on:
            await self._script("rabbitmqctl", "set_vm_memory_high_watermark", "absolute", "1",
                               logs=self._rabbit_logs())
        else:
            await self._script("rabbitmqctl", "set_vm_memory_high_watermark", DEFAULT_WATERMARK,
                               logs=self._rabbit_logs())

        async def reported() -> bool:
            return await self.memory_alarm_on() == on

        await self._until(f"rabbitmq memory alarm {'on' if on else 'off'}", reported,
                          self._rabbit_logs())
        log.info("private rabbitmq memory alarm %s", "on" if on else "off")

    async def memory_alarm_on(self) -> bool:
        """What the node reports (rabbitmq-diagnostics alarms)."""
        out = await self._run([*self._script_argv(), "rabbitmq-diagnostics", "-q", "alarms",
                               "--formatter", "json"], what="rabbitmq-diagnostics alarms",
                              logs=self._rabbit_logs(), capture=True)
        report = json.loads(out)
        alarms = [str(a) for key in ("alarms", "local", "global") for a in report.get(key, [])]
        return any("memory" in a.lower() for a in alarms)

    async def rabbitmq_answers(self) -> bool:
        if await _refused(self.amqp_port):
            return False  # said at once, without aiormq's error line for each probe
        try:
            connection = await aio_pika.connect(self.amqp_url, timeout=PROBE_S)
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError):
            return False
        await connection.close()
        return True

    # --- the processes and their logs ------------------------------------------------------

    def _postmaster(self) -> int | None:
        return self._pid_in(self.data_dir / "postgres" / "postmaster.pid", "postgres")

    def _redis_pid(self) -> int | None:
        return self._pid_in(self.data_dir / "redis" / "redis.pid", "redis-server")

    def _beam_pid(self) -> int | None:
        return self._pid_in(self.data_dir / "rabbitmq" / "rabbitmq.pid", "beam.smp")

    def _pid_in(self, pid_file: Path, comm: str) -> int | None:
        """The live process a pid file of ours names, if it is that server and works in our
        folder (a stale pid file may name a pid the system has since given to another)."""
        try:
            pid = int(pid_file.read_text().split()[0])
            ours = Path(os.readlink(f"/proc/{pid}/cwd")).is_relative_to(self.data_dir.resolve())
            named = Path(f"/proc/{pid}/comm").read_text().strip() == comm
        except (OSError, ValueError, IndexError):
            return None
        return pid if ours and named and _state(pid) not in (None, "Z") else None

    def _stopped_pids(self) -> list[int]:
        return [pid for pid in self.processes() if _state(pid) in STOPPED]

    async def _unpause(self) -> None:
        """Continue what pause_postgres stopped (and anything else of ours left stopped)."""
        pids = sorted({*self._paused, *self._stopped_pids()})
        for pid in pids:
            _signal(pid, signal.SIGCONT)
        self._paused = []
        await self._until("postgres continued",
                          lambda: not any(_state(pid) in STOPPED for pid in pids),
                          self._pg_logs())

    async def _postgres_down(self) -> bool:
        return self._postmaster() is None and await _refused(self.pg_port)

    async def _gone(self, pid: int, port: int) -> bool:
        return _state(pid) in (None, "Z") and await _refused(port)

    async def _app_stopped(self) -> bool:
        return self._beam_pid() is not None and await _refused(self.amqp_port)

    def _require(self, pid: int | None, name: str, logs: list[Path]) -> int:
        if pid is None:
            raise ServiceStateError(f"private {name} does not run{_tails(logs)}")
        return pid

    def _pg_logs(self) -> list[Path]:
        return [self.data_dir / "log" / "postgres.log", self.data_dir / "log" / "services.log"]

    def _redis_logs(self) -> list[Path]:
        return [self.data_dir / "log" / "redis.log", self.data_dir / "log" / "services.log"]

    def _rabbit_logs(self) -> list[Path]:
        logs = self.data_dir / "log" / "rabbitmq"
        return [logs / f"{self.node}.log", logs / "startup.log",
                self.data_dir / "log" / "services.log"]

    # --- running things ---------------------------------------------------------------------

    def _script_argv(self) -> list[str]:
        return ["bash", str(SERVICES_SH)]

    def _script_env(self) -> dict[str, str]:
        # Nothing of the caller's own PAYONCE_*, libpq or RabbitMQ settings may leak in: they
        # would point services.sh (or psql, or the node) elsewhere.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PAYONCE_", "PG", "RABBITMQ_"))}
        env.update({
            "PAYONCE_DATA_DIR": str(self.data_dir),
            "PAYONCE_SERVICES_VIA": "packages",
            # No UI: nobody looks at it, and it would hold each stop_app and stop for 5 s.
            "PAYONCE_RABBITMQ_MANAGEMENT": "0",
            "PAYONCE_DATABASE_URL":
                f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.pg_port}/{BASE_DATABASE}",
            "PAYONCE_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "PAYONCE_AMQP_URL": self.amqp_url,
        })
        return env

    async def _script(self, *args: str, logs: list[Path] | None = None,
                      within_s: float = SCRIPT_S) -> None:
        if logs is None:
            logs = [*self._pg_logs()[:1], *self._redis_logs()[:1], *self._rabbit_logs()]
        await self._run([*self._script_argv(), *args], what=f"services.sh {' '.join(args)}",
                        logs=logs, within_s=within_s)

    async def _run(self, argv: list[str], *, what: str, logs: list[Path],
                   within_s: float = SCRIPT_S, capture: bool = False) -> str:
        """Run a command to its end. Its output goes to log/services.log, never to a pipe that
        a server it starts could inherit and hold open; `capture` is for short CLI calls."""
        services_log = self.data_dir / "log" / "services.log"
        services_log.parent.mkdir(parents=True, exist_ok=True)
        with services_log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if capture else out,
                stderr=out, env=self._script_env(), cwd="/")
            try:
                stdout, _ = await asyncio.wait_for(proc.communicate(), within_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise ServiceStateError(
                    f"{what} did not finish within {within_s:.0f} s{_tails(logs)}") from None
        if proc.returncode != 0:
            raise ServiceStateError(f"{what} failed (exit {proc.returncode}){_tails(logs)}")
        return stdout.decode(errors="replace") if capture else ""

    async def _until(self, what: str, check: Callable[[], bool | Awaitable[bool]],
                     logs: list[Path], within_s: float = STATE_S) -> None:
        deadline = time.monotonic() + within_s
        while True:
            done = check()
            if done if isinstance(done, bool) else await done:
                return
            if time.monotonic() >= deadline:
                raise ServiceStateError(f"{what}: not so after {within_s:.0f} s{_tails(logs)}")
            await asyncio.sleep(POLL_S)


async def reap_stale() -> None:
    """Stop and remove what a run that was killed (its pytest process gone) left running."""
    for marker in glob.glob(f"/tmp/payonce-*/{MARKER}"):
        found = PrivateServices._from_marker(Path(marker))
        if found is None:
            continue
        owner, services = found
        if owner == os.getpid() or _state(owner) not in (None, "Z"):
            continue  # a live run's, maybe another engineer's
        log.warning("private services: stopping what a dead run left in %s", services.data_dir)
        try:
            await services.stop()
        except ServiceStateError:
            # Not this run's servers: its own start goes on, on other ports.
            log.exception("private services: could not clean up %s", services.data_dir)


def pick_ports() -> tuple[int, int, int]:
    """Free ports for Postgres, Redis and AMQP, the AMQP one with its Erlang distribution port
    (services.sh's AMQP + 20000, or - 10000) free too. Below the kernel's ephemeral range when
    it leaves room, so that while a server is down no outgoing connection takes its port."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    chosen: list[int] = []

    def free(port: int) -> bool:
        return 1024 <= port <= 65535 and port not in chosen and port not in MANAGEMENT_PORTS \
            and _bindable(port)

    def dist(port: int) -> int:
        return port + 20000 if port + 20000 <= 65535 else port - 10000

    def candidates(below: int) -> Iterator[int]:
        pool = range(10000, max(below, 10000))
        yield from random.sample(pool, min(len(pool), 500))
        for _ in range(200):  # a machine whose ephemeral range starts low: what the kernel gives
            yield _ephemeral_port()

    def pick(below: int, also: Callable[[int], bool]) -> int:
        for port in candidates(below):
            if free(port) and also(port):
                chosen.append(port)
                return port
        raise ServiceStateError("no free ports for the private services")

    pg = pick(low, lambda p: True)
    rd = pick(low, lambda p: True)
    # Its distribution port, AMQP + 20000, is then below the ephemeral range too.
    amqp = pick(low - 20000, lambda p: free(dist(p)))
    return pg, rd, amqp


def _new_folder() -> Path:
    data_dir = Path(tempfile.mkdtemp(prefix="payonce-", dir="/tmp"))
    # mkdtemp makes it 0700; the postgres and rabbitmq users must reach their folders in it.
    data_dir.chmod(0o755)
    return data_dir


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _refused(port: int) -> bool:
    """Nothing listens on the port (a paused server's port still accepts connections)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), PROBE_S)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None once the pid is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _state(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[0] if fields else None


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _pg_bindir() -> Path:
    """The newest server install, as services.sh picks it (Debian keeps pg_ctl out of PATH)."""
    dirs = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin") if Path(d, "pg_ctl").exists()]
    if dirs:
        return max(dirs, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    found = shutil.which("pg_ctl")
    if found is None:
        raise ServiceStateError("pg_ctl not found")
    return Path(found).parent


def _as_user(user: str, argv: list[str]) -> list[str]:
    """As services.sh's as_user: the server's own user when we are root."""
    if os.geteuid() != 0:
        return argv
    try:
        pwd.getpwnam(user)
    except KeyError:
        return argv
    return ["runuser", "-u", user, "--", *argv]


def _tails(logs: list[Path], lines: int = 20) -> str:
    parts = []
    for path in logs:
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        if tail:
            parts.append(f"\n--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "".join(parts)


# pytest makes one fixture definition per module that imports the fixture, each with its own
# session-wide value; sharing one instance keeps it to a single set of servers per run.
_shared: PrivateServices | None = None
_users = 0


# Named apart from the fixture, so a test's `private_services` argument does not redefine it.
@pytest.fixture(scope="session", name="private_services")
async def private_services_fixture() -> AsyncIterator[PrivateServices]:
    """Private PostgreSQL, Redis and RabbitMQ, started on first use and stopped at the end of
    the session. Tests share them: one that takes a server down brings it back (`heal`)."""
    global _shared, _users
    if _shared is None:
        _shared = await PrivateServices.start()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0:
            services, _shared = _shared, None
            await services.stop()
