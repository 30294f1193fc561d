"""`payonce edge --workers N`: N edge processes sharing one listening port.

Each worker is a whole edge (`payonce edge`) in a process of its own, bound to the port with
SO_REUSEPORT, so the kernel spreads new connections over them and every core can answer
requests. The edge keeps no state between requests that another process could need
(idempotency, pending markers and the heartbeat that lets a dead process's keys be taken
over are in Redis, per process), so workers need nothing from each other.

The supervisor starts them, starts again one that dies (after a pause, so a worker that
cannot start does not spin), and on SIGTERM or SIGINT passes the signal on and waits for
each to finish its requests. `/metrics` answers for all the workers together: they write
their samples to files in one directory (prometheus_client's multiprocess mode,
`PROMETHEUS_MULTIPROC_DIR`), which any worker reads back on a scrape.
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


def supervise(workers: int, args: list[str]) -> int:
    """Run `workers` edge processes (`payonce edge <args>`) until SIGTERM or SIGINT; 0 when
    they all stopped cleanly."""
    owned_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
        prefix="payonce-edge-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
           "PAYONCE_EDGE_REUSE_PORT": "true"}
    command = [sys.executable, "-m", "ops.cli", "edge", "--workers", "1", *args]
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    restart_at: dict[int, float] = {}
    try:
        for slot in range(workers):
            procs[slot] = subprocess.Popen(command, env=env)
        log.info("edge workers started", extra={"ids": {
            "workers": workers, "pids": [p.pid for p in procs.values()]}})
        while not stopping:
            time.sleep(0.2)
            for slot, proc in list(procs.items()):
                if slot in restart_at:
                    if time.monotonic() >= restart_at[slot] and not stopping:
                        del restart_at[slot]
                        procs[slot] = subprocess.Popen(command, env=env)
                        log.info("edge worker started again", extra={"ids": {
                            "slot": slot, "pid": procs[slot].pid}})
                    continue
                code = proc.poll()
                if code is not None:
                    multiprocess.mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
                    log.error("edge worker exited; starting it again", extra={"ids": {
                        "slot": slot, "pid": proc.pid, "code": code}})
                    restart_at[slot] = time.monotonic() + RESTART_PAUSE_S
        return _stop(stopping[0], [p for s, p in procs.items() if s not in restart_at],
                     metrics_dir)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if owned_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _stop(signum: int, procs: list[subprocess.Popen[bytes]], metrics_dir: str) -> int:
    log.info("stopping edge workers", extra={"ids": {"workers": len(procs)}})
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signum)
    deadline = time.monotonic() + STOP_GRACE_S
    clean = True
    for proc in procs:
        try:
            code = proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.error("edge worker did not stop in time; killed", extra={"ids": {
                "pid": proc.pid}})
            proc.kill()
            code = proc.wait()
        # Ended by the signal itself: a worker still starting, before its handlers were set.
        clean = clean and code in (0, -signum)
        multiprocess.mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
    return 0 if clean else 1
