"""The edge's Prometheus metrics."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "payonce_edge_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
LATENCY = Histogram(
    "payonce_edge_request_seconds", "HTTP request latency", ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
IDEMPOTENCY = Counter(
    "payonce_edge_idempotency_total",
    "Idempotency outcomes: new, replayed, replayed_from_postgres, in_use, mismatch",
    ["outcome"],
)
PUBLISHES = Counter("payonce_edge_publishes_total", "Commands published", ["command", "outcome"])
DEPENDENCY_ERRORS = Counter(
    "payonce_edge_dependency_errors_total", "Failures of a dependency: postgres, redis, rabbitmq",
    ["dependency"]
)
# Exported at 0 from the start, so dashboards and alerts see the series before any failure.
for _dependency in ("postgres", "redis", "rabbitmq"):
    DEPENDENCY_ERRORS.labels(_dependency)
RATE_LIMITED = Counter("payonce_edge_rate_limited_total",
                       "Requests refused with 429 because their account was over its limit")
SHED = Counter("payonce_edge_shed_total",
               "POSTs refused with 429 because this edge process ran its most at once")
POSTS_RUNNING = Gauge("payonce_edge_posts_running",
                      "POSTs this edge process runs, from the claim of their key to their 202")
LONGPOLL_WAITERS = Gauge(
    "payonce_edge_longpoll_waiters", "Requests waiting for an intent to change (?wait=N)"
)
LONGPOLLS = Counter(
    "payonce_edge_longpolls_total",
    "Long-polls, by how they ended: changed, deadline, at_rest (nothing under way: answered "
    "at once), client_gone, refused (too many waiting), released (the edge stopping)",
    ["outcome"],
)
for _outcome in ("changed", "deadline", "at_rest", "client_gone", "refused", "released"):
    LONGPOLLS.labels(_outcome)
LONGPOLL_NOTIFICATIONS = Counter(
    "payonce_edge_longpoll_notifications_total", "Status notifications received from Redis"
)
