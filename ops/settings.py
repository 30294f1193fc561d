"""All configuration, read from the environment once in `main` and passed down explicitly."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any


class SettingsError(ValueError):
    """An environment variable that cannot be turned into a setting."""


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
    processor_host: str = "0.0.0.0"
    processor_metrics_port: int = 9101
    log_format: str = "json"
    log_level: str = "INFO"

    # Stripe keeps idempotency keys at least 24 hours.
    idempotency_ttl_s: int = 24 * 3600
    # How long a key stays "in flight" if its edge dies mid-request; must exceed the slowest
    # publish (publish_timeout_s) so a live request never loses its lock.
    idempotency_lock_ms: int = 30_000
    publish_timeout_s: float = 10.0
    # How long the 425 marker of an accepted create lives; the processor applies it long before.
    pending_ttl_s: int = 24 * 3600
    max_body_bytes: int = 64 * 1024

    # Messages a partition consumer holds at once; bounds memory and intents in progress.
    prefetch: int = 256
    # PSP calls running at once per processor; each is mostly waiting on the network.
    psp_concurrency: int = 512
    psp_latency_ms: tuple[int, int] = (100, 400)
    psp_timeout_s: float = 10.0
    # After this many failed tries the PSP is asked for the attempt; see processor/attempts.py.
    psp_max_tries: int = 8
    # An attempt claimed by a processor that died is retried after its lease runs out. Longer
    # than one PSP call plus the longest pause between tries (psp_timeout_s + 5 s), so a live
    # processor never loses an attempt it is working on.
    psp_lease_s: float = 30.0
    psp_decline_rate: float = 0.0
    psp_error_rate: float = 0.0
    psp_timeout_rate: float = 0.0
    psp_lost_reply_rate: float = 0.0
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
        low, high = self.psp_latency_ms
        if not 0 <= low <= high:
            raise SettingsError("PAYONCE_PSP_LATENCY_MS must be 'LOW-HIGH' with 0 <= LOW <= HIGH")
        if self.partitions < 1:
            raise SettingsError("PAYONCE_PARTITIONS must be at least 1")
        for name in ("decline", "error", "timeout", "lost_reply"):
            if not 0.0 <= getattr(self, f"psp_{name}_rate") <= 1.0:
                raise SettingsError(f"PAYONCE_PSP_{name.upper()}_RATE must be within 0..1")
        return self

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
