"""All configuration, read from the environment once in `main` and passed down explicitly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any


class SettingsError(ValueError):
    """An environment variable that cannot be turned into a setting."""


# Time a request keeps its Idempotency-Key after its own deadline, to store its answer.
LOCK_MARGIN_S = 1.0
# Pauses between PSP tries double up to this, or to what the attempt's lease leaves.
PSP_BACKOFF_MAX_S = 5.0
MIN_PSP_PAUSE_S = 0.5


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "postgresql://payonce:payonce@127.0.0.1:5432/payonce"
    redis_url: str = "redis://127.0.0.1:6379/0"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # Derives object ids and client secrets: every edge and processor must share it.
    secret: str = ""
    amqp_prefix: str = "payonce"
    # Fixed for the life of a deployment: the partition of an intent is hash(id) % partitions.
    partitions: int = 4

    edge_host: str = "0.0.0.0"
    edge_port: int = 8080
    # Edge processes sharing the port (`payonce edge --workers N`, ops/workers.py); each
    # binds it with SO_REUSEPORT, which the supervisor turns on for them.
    edge_workers: int = 1
    edge_reuse_port: bool = False
    processor_host: str = "0.0.0.0"
    processor_metrics_port: int = 9101
    # Processor processes (`payonce processor --workers N`, ops/workers.py), and which one of
    # them this is (set by the supervisor): worker i is first to consume the partitions p with
    # p % N == i, and a standby for the others. Each serves /metrics and /ready on
    # processor_metrics_port + i.
    processor_workers: int = 1
    processor_worker: int = 0
    log_format: str = "json"
    log_level: str = "INFO"

    # Stripe keeps idempotency keys at least 24 hours.
    idempotency_ttl_s: int = 24 * 3600
    # Every PostgreSQL statement, connect and wait for a pooled connection gives up after this:
    # a half-open connection must fail a request well within its Idempotency-Key's lock.
    db_timeout_s: float = 2.0
    # Waiting for RabbitMQ's confirm of a command. A publish that times out may still be
    # queued (a broker under a memory alarm holds frames, then enqueues them): its key keeps
    # its fingerprint and the client is told to retry with the same key.
    publish_timeout_s: float = 5.0
    # The whole of a POST after validation (claim, inbox check, publish, store the answer) is
    # cut off after this, so no request outlives its lock. At least the publish timeout plus
    # two database calls.
    request_timeout_s: float = 10.0
    # How long a key stays "in flight" if its edge dies mid-request and nothing notices. Longer
    # than request_timeout_s, so a live request never loses its lock. A key whose edge is known
    # dead is free much sooner: see edge_heartbeat_s.
    idempotency_lock_ms: int = 12_000
    # Each edge process renews a liveness key this often (a quarter of it) with this expiry; a
    # key in flight on an edge whose liveness key expired is taken over by the next retry.
    edge_heartbeat_s: float = 2.0
    # After Redis lost its data (and with it the markers of commands accepted but not yet
    # applied), an unknown intent reads as 425 "not ready, retry" instead of 404 for this long:
    # long enough for the processor to apply what was queued before the loss.
    pending_loss_grace_s: float = 300.0
    # How long the 425 marker of an accepted create lives; the processor applies it long before.
    pending_ttl_s: int = 24 * 3600
    max_body_bytes: int = 64 * 1024
    # Requests per second each account may send to /v1, with bursts of this many more (0: no
    # limit). Stripe allows 100 per second in live mode and 25 in test mode.
    rate_limit_per_s: float = 0.0
    rate_limit_burst: int = 100
    # Long-polls (`?wait=N`) waiting at once in one edge process; past it a request that would
    # wait gets a 429. Each holds a socket and a few hundred bytes: the bound is the socket's.
    longpoll_max_waiters: int = 10_000
    # POSTs one edge process runs at once, up to their 202 (edge/admission.py); past it a POST
    # is refused with a 429 before anything is done (0: no bound). A process answers a few
    # hundred POSTs a second: 128 are far more than it runs at once below its full rate, and
    # at it they keep the wait of a POST taken within about a second.
    edge_max_posts: int = 128

    # Messages a partition consumer holds at once; bounds memory and intents in progress.
    prefetch: int = 256
    # PSP calls running at once per processor; each is mostly waiting on the network.
    psp_concurrency: int = 512
    psp_latency_ms: tuple[int, int] = (100, 400)
    psp_timeout_s: float = 10.0
    # After this many failed tries the PSP is asked for the attempt; see processor/attempts.py.
    psp_max_tries: int = 8
    # An attempt claimed by a processor that died is retried after its lease runs out. It is
    # renewed before each pause, so it must cover one PSP call plus a pause (checked below).
    psp_lease_s: float = 30.0
    psp_decline_rate: float = 0.0
    psp_error_rate: float = 0.0
    psp_timeout_rate: float = 0.0
    psp_lost_reply_rate: float = 0.0
    # Stablecoin payments (pm_crypto_usdc): the simulated chain adds a block every
    # psp_crypto_block_time_s, and the PSP answers once the payment's transaction has this
    # many confirmations. A call cut off by psp_timeout_s is retried with the same key and goes
    # on waiting for the same transaction, so the wait must fit in the attempt's tries
    # (checked below), not in one call.
    psp_crypto_confirmations: int = 3
    psp_crypto_block_time_s: float = 0.5
    # A refund of Stripe's refundFail test card succeeds, then fails this long after.
    psp_refund_fail_after_s: float = 5.0
    # A refund the PSP may still fail (its answer is not final) is asked about again this
    # often, with the same key, until the PSP's answer is final.
    refund_recheck_s: float = 5.0
    # A PSP result published but still not applied this long after (its command was
    # dead-lettered, or lost with a broker's data) is published again; applying it is
    # idempotent. Far longer than a partition takes to apply a result under load.
    psp_report_timeout_s: float = 60.0
    # An authorization not captured this long after it was made is released and its intent
    # canceled (cancellation_reason `automatic`): Stripe's window for card payments, 7 days.
    capture_window_s: float = 7 * 24 * 3600.0
    # Webhooks (processor/webhooks.py). Endpoints on private, loopback, link-local, multicast
    # or reserved addresses are refused unless this is on (local development and tests).
    webhook_allow_private: bool = False
    # One delivery attempt gives up after this: a receiver that hangs is a failed attempt.
    webhook_timeout_s: float = 10.0
    # Seconds from one failed attempt to the next (with jitter); after the last one the
    # delivery is failed. Standard Webhooks' schedule, roughly: 5 s, 5 min, 30 min, 2 h, 5 h,
    # 10 h, 24 h.
    webhook_retry_schedule: str = "5,300,1800,7200,18000,36000,86400"
    # Deliveries under way at once per dispatcher, and per endpoint: one slow endpoint holds at
    # most its own share. One endpoint receives at most this many deliveries per round trip
    # (claim, POST, settle): 32 at a few tens of milliseconds each keep up with every event of
    # a processor's full rate going to one endpoint, and a hanging one holds an eighth.
    webhook_concurrency: int = 256
    webhook_endpoint_concurrency: int = 32
    # An endpoint whose every attempt failed for this long is disabled, with an event.
    webhook_disable_after_s: float = 3 * 24 * 3600
    dispatcher_metrics_port: int = 9102
    # The outbox relay runs inside the processor unless this is off; then `payonce relay` runs
    # it as a process of its own, whose timing does not depend on the processor's load.
    processor_relay: bool = True
    relay_metrics_port: int = 9103
    # How often the sweeper looks for attempts and events that a crash left behind.
    sweep_interval_s: float = 1.0
    shutdown_grace_s: float = 20.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f"PAYONCE_{f.name.upper()}"
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            default = f.default
            try:
                values[f.name] = _parse(raw, default)
            except ValueError as exc:
                raise SettingsError(f"{name}={raw!r}: {exc}") from None
        return cls(**values).checked()

    def checked(self) -> Settings:
        """The settings, or SettingsError naming the first one that cannot work, alone or
        with the others."""
        low, high = self.psp_latency_ms
        if not 0 <= low <= high:
            raise SettingsError("PAYONCE_PSP_LATENCY_MS must be 'LOW-HIGH' with 0 <= LOW <= HIGH")
        if not 0 <= self.processor_worker < self.processor_workers <= self.partitions:
            raise SettingsError("PAYONCE_PROCESSOR_WORKERS must be from 1 to PAYONCE_PARTITIONS "
                                "(each worker is first on a partition of its own), and "
                                "PAYONCE_PROCESSOR_WORKER from 0 to one less")
        for name in ("partitions", "edge_workers", "prefetch", "psp_concurrency",
                     "psp_max_tries", "idempotency_ttl_s", "pending_ttl_s", "max_body_bytes",
                     "longpoll_max_waiters", "psp_crypto_confirmations"):
            if getattr(self, name) < 1:
                raise SettingsError(f"PAYONCE_{name.upper()} must be at least 1")
        for name in ("db_timeout_s", "publish_timeout_s", "request_timeout_s",
                     "edge_heartbeat_s", "pending_loss_grace_s", "psp_timeout_s", "psp_lease_s",
                     "psp_report_timeout_s", "sweep_interval_s", "capture_window_s",
                     "psp_crypto_block_time_s", "refund_recheck_s"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"PAYONCE_{name.upper()} must be more than 0")
        for name in ("decline", "error", "timeout", "lost_reply"):
            if not 0.0 <= getattr(self, f"psp_{name}_rate") <= 1.0:
                raise SettingsError(f"PAYONCE_PSP_{name.upper()}_RATE must be within 0..1")
        if self.request_timeout_s < self.publish_timeout_s + 2 * self.db_timeout_s:
            raise SettingsError(
                f"PAYONCE_REQUEST_TIMEOUT_S ({self.request_timeout_s}) must be at least "
                f"PAYONCE_PUBLISH_TIMEOUT_S + 2 x PAYONCE_DB_TIMEOUT_S "
                f"({self.publish_timeout_s + 2 * self.db_timeout_s}): a request publishes once "
                "and reads the database at least twice")
        if self.idempotency_lock_ms < (self.request_timeout_s + LOCK_MARGIN_S) * 1000:
            raise SettingsError(
                f"PAYONCE_IDEMPOTENCY_LOCK_MS ({self.idempotency_lock_ms}) must exceed "
                f"PAYONCE_REQUEST_TIMEOUT_S by {LOCK_MARGIN_S} s "
                f"({(self.request_timeout_s + LOCK_MARGIN_S) * 1000:.0f}): a live request must "
                "never lose its key")
        if self.psp_lease_s < self.psp_timeout_s + MIN_PSP_PAUSE_S:
            raise SettingsError(
                f"PAYONCE_PSP_LEASE_S ({self.psp_lease_s}) must be at least PAYONCE_PSP_TIMEOUT_S "
                f"+ {MIN_PSP_PAUSE_S} s ({self.psp_timeout_s + MIN_PSP_PAUSE_S}): a lease covers "
                "one PSP call and the pause before the next try, or a live processor loses an "
                "attempt it is working on")
        if self.psp_refund_fail_after_s < 0:
            raise SettingsError("PAYONCE_PSP_REFUND_FAIL_AFTER_S must be at least 0")
        settle_s = self.psp_crypto_confirmations * self.psp_crypto_block_time_s
        if settle_s >= self.psp_max_tries * self.psp_timeout_s:
            raise SettingsError(
                f"PAYONCE_PSP_CRYPTO_CONFIRMATIONS x PAYONCE_PSP_CRYPTO_BLOCK_TIME_S "
                f"({settle_s:g} s) must be less than PAYONCE_PSP_MAX_TRIES x "
                f"PAYONCE_PSP_TIMEOUT_S ({self.psp_max_tries * self.psp_timeout_s:g} s): a "
                "stablecoin payment must be confirmed before its attempt runs out of tries")
        try:
            schedule = self.webhook_retry_schedule_s
        except ValueError:
            schedule = ()
        if not schedule or any(p < 0 for p in schedule):
            raise SettingsError("PAYONCE_WEBHOOK_RETRY_SCHEDULE must be seconds between "
                                "attempts, comma-separated (e.g. 5,300,1800)")
        if self.edge_max_posts < 0:
            raise SettingsError("PAYONCE_EDGE_MAX_POSTS must be 0 (no bound) or more")
        if self.rate_limit_per_s < 0 or self.rate_limit_burst < 0:
            raise SettingsError("PAYONCE_RATE_LIMIT_PER_S and PAYONCE_RATE_LIMIT_BURST must not "
                                "be negative")
        for name in ("webhook_concurrency", "webhook_endpoint_concurrency"):
            if getattr(self, name) < 1:
                raise SettingsError(f"PAYONCE_{name.upper()} must be at least 1")
        if not self.webhook_timeout_s > 0:
            raise SettingsError("PAYONCE_WEBHOOK_TIMEOUT_S must be more than 0")
        if self.capture_window_s < self.sweep_interval_s:
            raise SettingsError(
                f"PAYONCE_CAPTURE_WINDOW_S ({self.capture_window_s}) must be at least "
                f"PAYONCE_SWEEP_INTERVAL_S ({self.sweep_interval_s}): the sweeper finds "
                "expired authorizations no sooner than that")
        if self.psp_report_timeout_s <= self.psp_lease_s:
            raise SettingsError(
                f"PAYONCE_PSP_REPORT_TIMEOUT_S ({self.psp_report_timeout_s}) must exceed "
                f"PAYONCE_PSP_LEASE_S ({self.psp_lease_s})")
        return self

    @property
    def webhook_retry_schedule_s(self) -> tuple[float, ...]:
        """The pauses between delivery attempts, in seconds."""
        return tuple(float(p) for p in self.webhook_retry_schedule.split(","))

    @property
    def psp_max_pause_s(self) -> float:
        """The longest pause between PSP tries: what the lease leaves after one call."""
        return min(PSP_BACKOFF_MAX_S, self.psp_lease_s - self.psp_timeout_s)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes).checked()

    @property
    def secret_bytes(self) -> bytes:
        if not self.secret:
            raise SettingsError("PAYONCE_SECRET is not set (any long random string)")
        return self.secret.encode()


def _parse(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, tuple):
        low, sep, high = raw.partition("-")
        return (int(low), int(high)) if sep else (int(low), int(low))
    return raw
