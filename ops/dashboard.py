"""payonce's Grafana dashboard, written as data: `payonce dashboard > ops/grafana/dashboards/
payonce.json`. Golden signals on top, then a row each for the edge, the processor, the PSP,
RabbitMQ, webhooks and the processes.

Every expression returns data on a stack that has just processed payments (tests/
test_dashboard.py evaluates each one against a real Prometheus): rates of things that may not
have happened yet fall back to `vector(0)`, so an empty panel always means a missing metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
# Rates over a minute: short enough to see a fault as it happens at a 15 s scrape interval.
WINDOW = "1m"


@dataclass(frozen=True, slots=True)
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (expression, legend)
    unit: str = "short"
    description: str = ""


@dataclass(frozen=True, slots=True)
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def rate(metric: str, by: str = "", matchers: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{matchers}}}[{WINDOW}])) or vector(0)"


def quantile(q: float, metric: str, by: str = "", matchers: str = "") -> str:
    grouping = ", ".join(filter(None, ("le", by)))
    return (f"histogram_quantile({q}, sum by ({grouping}) "
            f"(rate({metric}_bucket{{{matchers}}}[{WINDOW}])))")


ROWS = [
    Row("Golden signals", [
        Panel("Requests per second", [(rate("payonce_edge_requests_total"), "requests")],
              "reqps"),
        Panel("Errors (5xx share of requests)", [(
            "((" + rate("payonce_edge_requests_total", matchers='status=~"5.."') + ")"
            " / (sum(rate(payonce_edge_requests_total[1m])) > 0)) or vector(0)", "5xx share")],
            "percentunit"),
        Panel("Accept latency (POST → 202)", [
            (quantile(0.5, "payonce_edge_request_seconds", matchers='method="POST"'), "p50"),
            (quantile(0.99, "payonce_edge_request_seconds", matchers='method="POST"'), "p99")],
            "s"),
        Panel("Payments settled per second", [(rate(
            "payonce_processor_commands_total",
            matchers='command="payment_intent.psp_result", outcome="applied"'), "settled")],
            "ops"),
        Panel("Saturation", [
            ("sum(payonce_processor_intents_in_progress)", "intents in progress"),
            ("sum(payonce_processor_psp_in_flight)", "PSP calls in flight"),
            ("sum(payonce_dispatcher_in_flight)", "deliveries in flight")]),
    ]),
    Row("Edge", [
        Panel("Requests by route and status", [(
            rate("payonce_edge_requests_total", "route, method, status"),
            "{{method}} {{route}} {{status}}")], "reqps"),
        Panel("Latency by route (p99)", [(
            quantile(0.99, "payonce_edge_request_seconds", "route, method"),
            "{{method}} {{route}}")], "s"),
        Panel("Idempotency outcomes", [(
            rate("payonce_edge_idempotency_total", "outcome"), "{{outcome}}")], "ops"),
        Panel("Publishes by outcome", [(
            rate("payonce_edge_publishes_total", "outcome"), "{{outcome}}")], "ops"),
        Panel("Dependency errors", [(
            rate("payonce_edge_dependency_errors_total", "dependency"), "{{dependency}}")],
            "ops"),
    ]),
    Row("Processor", [
        Panel("Commands by type and outcome", [(
            rate("payonce_processor_commands_total", "command, outcome"),
            "{{command}} {{outcome}}")], "ops"),
        Panel("Apply latency (p99)", [(
            quantile(0.99, "payonce_processor_apply_seconds", "command"), "{{command}}")], "s"),
        Panel("Settle lag: accepted → applied (p99)", [(
            quantile(0.99, "payonce_processor_command_lag_seconds", "command"),
            "{{command}}")], "s"),
        Panel("Outbox lag", [("max(payonce_processor_outbox_lag_seconds)", "oldest unpublished")],
              "s"),
        Panel("Events published per second", [(
            rate("payonce_processor_events_published_total"), "events")], "ops"),
        Panel("Stuck intents and dead letters", [
            ("max(payonce_processor_intents_stuck)", "processing > 5 min"),
            ("max(payonce_dead_letter_queue_messages)", "dead-letter queue")]),
        Panel("Background loops: seconds since the last beat", [(
            "max by (loop) (time() - payonce_loop_last_beat_timestamp_seconds)", "{{loop}}")],
            "s"),
        Panel("Transient failures", [(
            rate("payonce_processor_transient_failures_total", "where"), "{{where}}")], "ops"),
    ]),
    Row("PSP", [
        Panel("Calls by result", [(
            rate("payonce_processor_psp_calls_total", "result"), "{{result}}")], "ops"),
        Panel("Call latency by result (p99)", [(
            quantile(0.99, "payonce_processor_psp_call_seconds", "result"), "{{result}}")], "s"),
        Panel("Attempts waiting for a PSP slot", [(
            "sum(payonce_processor_attempts_waiting)", "waiting")]),
        Panel("Results reported again", [(
            rate("payonce_processor_results_rereported_total"), "re-reported")], "ops"),
    ]),
    Row("RabbitMQ", [
        Panel("Messages ready by queue", [(
            "sum by (queue) (rabbitmq_detailed_queue_messages_ready)", "{{queue}}")]),
        Panel("Messages unacked by queue", [(
            "sum by (queue) (rabbitmq_detailed_queue_messages_unacked)", "{{queue}}")]),
        Panel("Consumers by queue", [(
            "sum by (queue) (rabbitmq_detailed_queue_consumers)", "{{queue}}")]),
    ]),
    Row("Webhooks", [
        Panel("Deliveries finished by outcome", [(
            rate("payonce_dispatcher_deliveries_total", "outcome"), "{{outcome}}")], "ops"),
        Panel("Attempts by result", [(
            rate("payonce_dispatcher_attempts_total", "result"), "{{result}}")], "ops"),
        Panel("Delivery lag: event → 2xx", [
            (quantile(0.5, "payonce_dispatcher_delivery_lag_seconds"), "p50"),
            (quantile(0.99, "payonce_dispatcher_delivery_lag_seconds"), "p99")], "s"),
        Panel("Due and not sent", [
            ("max(payonce_dispatcher_due_deliveries)", "due deliveries"),
            ("max(payonce_dispatcher_due_oldest_seconds)", "oldest due (s)")]),
    ]),
    Row("Processes", [
        Panel("CPU by process", [(
            "sum by (job) (rate(process_cpu_seconds_total[1m]))", "{{job}}")], "percentunit"),
        Panel("Resident memory by process", [(
            "sum by (job) (process_resident_memory_bytes)", "{{job}}")], "bytes"),
        Panel("Up", [("up", "{{job}} {{instance}}")]),
    ]),
]


def expressions() -> list[str]:
    """Every expression of every panel."""
    return [expr for row in ROWS for panel in row.panels for expr, _ in panel.targets]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        next_id += 1
        y += 1
        width = 24 // min(len(row.panels), 4)
        for i, panel in enumerate(row.panels):
            panels.append({
                "id": next_id,
                "type": "timeseries",
                "title": panel.title,
                "description": panel.description,
                "datasource": DATASOURCE,
                "gridPos": {"x": (i % 4) * width, "y": y + (i // 4) * 8, "w": width, "h": 8},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi"}},
                "targets": [{"datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                             "refId": chr(ord("A") + n)}
                            for n, (expr, legend) in enumerate(panel.targets)],
            })
            next_id += 1
        y += 8 * ((len(row.panels) + 3) // 4)
    return {
        "uid": "payonce",
        "title": "payonce",
        "tags": ["payonce"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "panels": panels,
    }


def render() -> bytes:
    return orjson.dumps(dashboard(), option=orjson.OPT_INDENT_2) + b"\n"
