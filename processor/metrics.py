"""The processor's Prometheus metrics."""

from prometheus_client import Counter, Gauge, Histogram

COMMANDS = Counter(
    "payonce_processor_commands_total",
    "Commands handled, by outcome: applied, duplicate, rejected, dead_lettered",
    ["command", "outcome"],
)
APPLY_SECONDS = Histogram(
    "payonce_processor_apply_seconds", "Time to apply one command in Postgres", ["command"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
TRANSIENT_FAILURES = Counter(
    "payonce_processor_transient_failures_total", "Retried failures of a dependency", ["where"]
)
PSP_CALLS = Counter(
    "payonce_processor_psp_calls_total",
    "PSP calls, by result: succeeded, declined, unavailable, timeout, rejected",
    ["result"],
)
PSP_IN_FLIGHT = Gauge("payonce_processor_psp_in_flight", "PSP calls under way")
INTENTS_IN_PROGRESS = Gauge(
    "payonce_processor_intents_in_progress", "Intents with commands being applied"
)
EVENTS_PUBLISHED = Counter("payonce_processor_events_published_total", "Events relayed")
OUTBOX_LAG = Gauge(
    "payonce_processor_outbox_lag_seconds",
    "Age of the oldest event not yet published, as the relay last saw it (0 when caught up)",
)
