"""The webhook dispatcher's Prometheus metrics. Labels are bounded: outcomes and reasons,
never endpoint, event or account ids."""

from prometheus_client import Counter, Gauge, Histogram

EVENTS_TAKEN = Counter(
    "payonce_dispatcher_events_total",
    "Messages taken from the webhook queue, by outcome: queued (its deliveries recorded), "
    "not_an_event, unknown_event (not in the events table), failed (dropped after an error "
    "of its own)",
    ["outcome"],
)
DELIVERIES_RECORDED = Counter(
    "payonce_dispatcher_deliveries_recorded_total",
    "Deliveries recorded: one per event and endpoint that subscribed to it",
)
ATTEMPTS = Counter(
    "payonce_dispatcher_attempts_total",
    "Delivery attempts, by result: succeeded, http_error, redirect, timeout, refused, "
    "forbidden, connection_error",
    ["result"],
)
DELIVERIES = Counter(
    "payonce_dispatcher_deliveries_total",
    "Deliveries finished, by outcome: succeeded, failed (out of attempts), gone (the endpoint "
    "answered 410), abandoned (the endpoint was disabled or deleted)",
    ["outcome"],
)
# Exported at 0 from the start, so a dashboard's rate of failed deliveries reads 0 rather
# than no data until the first one fails.
for _outcome in ("succeeded", "failed", "gone", "abandoned"):
    DELIVERIES.labels(_outcome)
RETRIES_SCHEDULED = Counter(
    "payonce_dispatcher_retries_scheduled_total", "Failed attempts with another one scheduled"
)
ENDPOINTS_DISABLED = Counter(
    "payonce_dispatcher_endpoints_disabled_total",
    "Endpoints disabled by the dispatcher, by reason: gone (410), failing (every attempt "
    "failed for PAYONCE_WEBHOOK_DISABLE_AFTER_S)",
    ["reason"],
)
ATTEMPT_SECONDS = Histogram(
    "payonce_dispatcher_attempt_seconds", "Duration of one delivery attempt (the POST)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DELIVERY_LAG = Histogram(
    "payonce_dispatcher_delivery_lag_seconds",
    "From an event's creation to the 2xx of its delivery to one endpoint",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 86400),
)
IN_FLIGHT = Gauge("payonce_dispatcher_in_flight", "Delivery attempts under way")
TRANSIENT_FAILURES = Counter(
    "payonce_dispatcher_transient_failures_total",
    "Retried failures of a dependency, by where: intake, claim, settle", ["where"],
)
# Read from Postgres at every scrape, not kept by the loops they watch.
DUE_BACKLOG = Gauge(
    "payonce_dispatcher_due_deliveries",
    "Deliveries due now and not yet sent (NaN when unreadable)",
)
DUE_OLDEST = Gauge(
    "payonce_dispatcher_due_oldest_seconds",
    "How long the longest-waiting due delivery has been due (0 when none; NaN when unreadable)",
)
