"""`payonce edge --workers N` and `payonce processor --workers N`: N processes of one kind,
under one supervisor.

Each edge worker is a whole edge (`payonce edge`) in a process of its own, bound to the port
with SO_REUSEPORT, so the kernel spreads new connections over them and every core can answer
requests. The edge keeps no state between requests that another process could need
(idempotency, pending markers and the heartbeat that lets a dead process's keys be taken
over are in Redis, per process), so workers need nothing from each other. `/metrics` answers
for all the edge workers together: they write their samples to files in one directory
(prometheus_client's multiprocess mode, `PROMETHEUS_MULTIPROC_DIR`), which any worker reads
back on a scrape.

Each processor worker is a whole processor told which one of the N it is
(`PAYONCE_PROCESSOR_WORKER`): it consumes its own share of the partitions first and attaches to
the others as a standby, so the partitions' single active consumers are spread over the
workers and a worker that dies has its partitions taken over by the others at once
(processor/app.py). Each serves its own `/metrics` and `/ready`, on the metrics port plus its
number.

The supervisor starts them, starts again one that dies (after a pause, so a worker that
cannot start does not spin), and on SIGTERM or SIGINT passes the signal on and waits for
each to finish its work.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from prometheus_client import multiprocess

log = logging.getLogger(__name__)

# A worker that dies is started again after this long.
RESTART_PAUSE_S = 1.0
# How long workers get to finish their requests after the signal, before they are killed.
STOP_GRACE_S = 30.0


def supervise(workers: int, args: list[str], kind: str = "edge") -> int:
    """Run `workers` processes of `kind` (`payonce <kind> <args>`: edge or processor) until
    SIGTERM or SIGINT; 0 when they all stopped cleanly."""
    # Edge workers share one metrics directory; processor workers answer for themselves.
    owned_dir = kind == "edge" and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir: str | None = None
    if kind == "edge":
        metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
            prefix="payonce-edge-metrics-")
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
               "PAYONCE_EDGE_REUSE_PORT": "true"}
    else:
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    # A processor worker knows it is one from PAYONCE_PROCESSOR_WORKER, an edge worker from
    # being told it is alone.
    command = [sys.executable, "-m", "ops.cli", kind, *(["--workers", "1"] if kind == "edge"
                                                         else []), *args]
    stopping: list[int] = []

    def start(slot: int) -> subprocess.Popen[bytes]:
        if kind == "edge":
            return subprocess.Popen(command, env=env)
        return subprocess.Popen(command, env={**env, "PAYONCE_PROCESSOR_WORKERS": str(workers),
                                              "PAYONCE_PROCESSOR_WORKER": str(slot)})

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    restart_at: dict[int, float] = {}
    try:
        for slot in range(workers):
            procs[slot] = start(slot)
        log.info(f"{kind} workers started", extra={"ids": {
            "workers": workers, "pids": [p.pid for p in procs.values()]}})
        while not stopping:
            time.sleep(0.2)
            for slot, proc in list(procs.items()):
                if slot in restart_at:
                    if time.monotonic() >= restart_at[slot] and not stopping:
                        del restart_at[slot]
                        procs[slot] = start(slot)
                        log.info(f"{kind} worker started again", extra={"ids": {
                            "slot": slot, "pid": procs[slot].pid}})
                    continue
                code = proc.poll()
                if code is not None:
                    _forget(proc.pid, metrics_dir)
                    log.error(f"{kind} worker exited; starting it again", extra={"ids": {
                        "slot": slot, "pid": proc.pid, "code": code}})
                    restart_at[slot] = time.monotonic() + RESTART_PAUSE_S
        return _stop(kind, stopping[0], [p for s, p in procs.items() if s not in restart_at],
                     metrics_dir)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if owned_dir and metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _forget(pid: int, metrics_dir: str | None) -> None:
    """A worker's live gauges stop counting once it is gone."""
    if metrics_dir is not None:
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]


def _stop(kind: str, signum: int, procs: list[subprocess.Popen[bytes]],
          metrics_dir: str | None) -> int:
    log.info(f"stopping {kind} workers", extra={"ids": {"workers": len(procs)}})
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signum)
    deadline = time.monotonic() + STOP_GRACE_S
    clean = True
    for proc in procs:
        try:
            code = proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.error(f"{kind} worker did not stop in time; killed", extra={"ids": {
                "pid": proc.pid}})
            proc.kill()
            code = proc.wait()
        # Ended by the signal itself: a worker still starting, before its handlers were set.
        clean = clean and code in (0, -signum)
        _forget(proc.pid, metrics_dir)
    return 0 if clean else 1
