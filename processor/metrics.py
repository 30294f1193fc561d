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
BATCHES = Counter(
    "payonce_processor_batches_total",
    "Batches of commands, by outcome: applied, split (failed; applied one by one)", ["outcome"],
)
BATCH_SIZE = Histogram(
    "payonce_processor_batch_commands", "Commands in one applied batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_SECONDS = Histogram(
    "payonce_processor_batch_seconds", "Time to apply one batch in Postgres",
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
SETTLE_LAG = Histogram(
    "payonce_processor_command_lag_seconds",
    "From a command's acceptance at the edge (whole seconds) to its application",
    ["command"], buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
)
TRANSIENT_FAILURES = Counter(
    "payonce_processor_transient_failures_total", "Retried failures of a dependency", ["where"]
)
# Exported at 0 from the start, so dashboards and alerts see the series before any failure.
for _where in ("apply", "pending_marker", "attempt", "attempt_unexpected", "psp_task",
               "psp_task_unexpected", "expiry"):
    TRANSIENT_FAILURES.labels(_where)
PSP_CALLS = Counter(
    "payonce_processor_psp_calls_total",
    "PSP calls, by result: succeeded, declined, unavailable, timeout, rejected, error",
    ["result"],
)
PSP_SECONDS = Histogram(
    "payonce_processor_psp_call_seconds", "Duration of one PSP call, by result", ["result"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PSP_IN_FLIGHT = Gauge("payonce_processor_psp_in_flight", "PSP calls under way")
INTENTS_IN_PROGRESS = Gauge(
    "payonce_processor_intents_in_progress", "Intents with commands being applied"
)
EVENTS_PUBLISHED = Counter("payonce_processor_events_published_total", "Events relayed")
EVENT_PUBLISH_SECONDS = Histogram(
    "payonce_processor_event_publish_seconds",
    "From an event's write (its `created`, Postgres's clock) to RabbitMQ's confirm of it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5,
             10, 30, 60),
)
# The gauges below are read from Postgres and RabbitMQ when /metrics is scraped, not kept by
# the loops they watch: a dead relay cannot freeze its own lag.
OUTBOX_LAG = Gauge(
    "payonce_processor_outbox_lag_seconds",
    "Age of the oldest event not yet published (0 when caught up; NaN when unreadable)",
)
INTENTS_STUCK = Gauge(
    "payonce_processor_intents_stuck",
    "Intents processing for longer than the stuck threshold (NaN when unreadable)",
)
DEAD_LETTER_DEPTH = Gauge(
    "payonce_dead_letter_queue_messages",
    "Messages waiting in the dead-letter queue for an operator (NaN when unreadable)",
)
DEAD_LETTERS = Counter(
    "payonce_processor_dead_letters_total",
    "Messages seen arriving in the dead-letter queue, by the broker's reason", ["reason"],
)
ATTEMPTS_WAITING = Gauge(
    "payonce_processor_attempts_waiting", "Attempts kicked, waiting for a free PSP slot"
)
ATTEMPTS_DEFERRED = Counter(
    "payonce_processor_attempts_deferred_total",
    "Attempts kicked while the waiting list was full, left to the sweeper",
)
RESULTS_REREPORTED = Counter(
    "payonce_processor_results_rereported_total",
    "PSP results published again because they were not applied in time",
)
AUTHORIZATIONS_EXPIRED = Counter(
    "payonce_processor_authorizations_expired_total",
    "Uncaptured authorizations past the capture window, sent to be canceled",
)
STATUS_NOTIFICATIONS = Counter(
    "payonce_processor_status_notifications_total",
    "Status notifications published to Redis for the edges' long-polls",
)
STATUS_UNREADABLE = Counter(
    "payonce_processor_status_unreadable_total",
    "Messages of the status queue that did not decode as an event, dropped",
)
