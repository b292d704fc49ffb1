"""Prometheus metrics, one registry per application (tests and workers never share globals).

Under several ``relay serve`` workers each process has its own registry (see :class:`Metrics`).
"""

from __future__ import annotations

import dataclasses
import math

import prometheus_client as prom

from relay import models
from relay.domain import stalls, status
from relay.store import runs

CONTENT_TYPE = prom.CONTENT_TYPE_LATEST
DOCUMENT_STATES = tuple(state.value for state in models.DocumentState)


@dataclasses.dataclass(frozen=True)
class Metrics:
    """The metrics of one application, in a registry of their own.

    Under several ``relay serve`` workers each process has its own registry and Prometheus scrapes
    whichever answers; counters are per process. The document gauges and the roles' and queues'
    gauges (what ``relay status`` shows) are read from PostgreSQL and RabbitMQ at scrape time, so
    they are the same whichever worker answers. The latter come from one look, without ``relay
    status``'s second look at a queue that seems stalled: alert on them with a ``for:`` duration.
    """

    registry: prom.CollectorRegistry
    webhooks: prom.Counter
    webhook_seconds: prom.Histogram
    events_per_message: prom.Histogram
    admin_auth_failures: prom.Counter
    connections_open: prom.Gauge
    connections_cut: prom.Gauge
    documents: prom.Gauge
    heartbeat_age: prom.Gauge
    work_age: prom.Gauge
    roles: prom.Gauge
    stalled: prom.Gauge
    queue_ready: prom.Gauge
    queue_consumers: prom.Gauge
    oldest_age: prom.Gauge
    last_run_started: prom.Gauge
    last_run_finished: prom.Gauge

    def webhook(self, outcome: str, seconds: float) -> None:
        """Count a webhook answered, with its outcome (queued, bad_signature, ...) and duration."""
        self.webhooks.labels(outcome).inc()
        self.webhook_seconds.observe(seconds)

    def published(self, events: int) -> None:
        """Count a message the intake published on the events queue, and the events it held."""
        self.events_per_message.observe(events)

    def admin_auth_failed(self, reason: str) -> None:
        """Count a request to the admin API refused for its token (missing or wrong token)."""
        self.admin_auth_failures.labels(reason).inc()

    def set_connections(self, open_now: int, cut: dict[str, int]) -> None:
        """Set this worker's open HTTP connections, and those it cut off at a bound, by bound."""
        self.connections_open.set(open_now)
        for bound, count in cut.items():
            self.connections_cut.labels(bound).set(count)

    def set_documents(self, counts: dict[str, int]) -> None:
        """Set the count of documents in every state (zero when none).

        ``in_doubt`` needs an operator.
        """
        for state in DOCUMENT_STATES:
            self.documents.labels(state).set(counts.get(state, 0))

    def set_status(self, report: status.Report) -> None:
        """Set the roles' and queues' gauges from one look.

        Running roles are counted by host and pid, all of them by state.
        """
        self.heartbeat_age.clear()
        self.work_age.clear()
        counts: dict[tuple[str, str], int] = {
            (role, state): 0
            for role in ("serve", "consume", "scheduler", "flush")
            for state in (stalls.OK, stalls.STALLED, stalls.STOPPED, stalls.GONE)
        }
        for judged in report.roles:
            row = judged.role
            counts[row.role, judged.state] = counts.get((row.role, judged.state), 0) + 1
            if judged.state not in (stalls.OK, stalls.STALLED):
                continue
            labels = (row.role, row.command, row.host, str(row.pid))
            self.heartbeat_age.labels(*labels).set(row.beat_age_s)
            if row.work_age_s is not None:
                self.work_age.labels(*labels).set(row.work_age_s)
        for (role, state), count in counts.items():
            self.roles.labels(role, state).set(count)
        self.stalled.set(report.stalled())
        self.queue_ready.clear()
        self.queue_consumers.clear()
        queues = report.queues
        if queues is not None:
            for depth in (queues.events, *queues.retry, queues.dead_letter):
                if depth.ready is not None:
                    self.queue_ready.labels(depth.name).set(depth.ready)
            if queues.events.consumers is not None:
                self.queue_consumers.labels(queues.events.name).set(queues.events.consumers)
        events = report.events
        self.oldest_age.set(
            events.oldest_age_s
            if events.oldest_age_s is not None
            else 0.0
            if events.oldest == "none waiting"
            else math.nan
        )

    def set_last_scheduled_run(self, run: runs.Run | None) -> None:
        """Set when the last scheduled run started and finished (0 if none yet, or not finished)."""
        started = run.started_at.timestamp() if run is not None else 0.0
        finished = run.finished_at.timestamp() if run is not None and run.finished_at else 0.0
        self.last_run_started.set(started)
        self.last_run_finished.set(finished)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)


def create() -> Metrics:
    """Create a fresh registry with every metric the relay records (one per application)."""
    registry = prom.CollectorRegistry()
    return Metrics(
        registry=registry,
        webhooks=prom.Counter(
            "relay_webhooks", "Webhooks received, by outcome", ["outcome"], registry=registry
        ),
        webhook_seconds=prom.Histogram(
            "relay_webhook_seconds",
            "Time to verify and durably queue a webhook",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=registry,
        ),
        events_per_message=prom.Histogram(
            "relay_events_per_message",
            "Events in each message the intake published on the events queue",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=registry,
        ),
        admin_auth_failures=prom.Counter(
            "relay_admin_auth_failures",
            "Requests to the admin API refused for their bearer token, by reason",
            ["reason"],
            registry=registry,
        ),
        connections_open=prom.Gauge(
            "relay_http_connections_open",
            "HTTP connections this worker holds open",
            registry=registry,
        ),
        connections_cut=prom.Gauge(
            "relay_http_connections_cut",
            "HTTP connections this worker cut off since it started, by bound (connections, "
            "header_bytes, header_timeout, body_timeout)",
            ["bound"],
            registry=registry,
        ),
        documents=prom.Gauge(
            "relay_documents",
            "Documents by state (in_doubt needs an operator)",
            ["state"],
            registry=registry,
        ),
        heartbeat_age=prom.Gauge(
            "relay_role_heartbeat_age_seconds",
            "Seconds since each running role's last heartbeat",
            ["role", "command", "host", "pid"],
            registry=registry,
        ),
        work_age=prom.Gauge(
            "relay_role_last_work_age_seconds",
            "Seconds since each running role last did work (webhook, event, document)",
            ["role", "command", "host", "pid"],
            registry=registry,
        ),
        roles=prom.Gauge(
            "relay_roles",
            "Roles seen in the last hour, by state (ok, stalled, stopped, gone)",
            ["role", "state"],
            registry=registry,
        ),
        stalled=prom.Gauge(
            "relay_stalled",
            "Stalled roles, plus one when messages wait on the events queue and no consumer holds any",
            registry=registry,
        ),
        queue_ready=prom.Gauge(
            "relay_queue_ready_messages",
            "Messages ready (not delivered) in each queue: events, retry, dead letters",
            ["queue"],
            registry=registry,
        ),
        queue_consumers=prom.Gauge(
            "relay_queue_consumers",
            "Consumers subscribed to the events queue",
            ["queue"],
            registry=registry,
        ),
        oldest_age=prom.Gauge(
            "relay_events_oldest_message_age_seconds",
            "Age of the oldest waiting event (0: none waits; NaN: unknown, nobody holds one)",
            registry=registry,
        ),
        last_run_started=prom.Gauge(
            "relay_last_scheduled_run_started_timestamp_seconds",
            "When the last scheduled run started (Unix time; 0: none yet)",
            registry=registry,
        ),
        last_run_finished=prom.Gauge(
            "relay_last_scheduled_run_finished_timestamp_seconds",
            "When the last scheduled run finished (Unix time; 0: none yet, or not finished)",
            registry=registry,
        ),
    )
