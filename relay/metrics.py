"""Prometheus metrics, one registry per application (tests and workers never share globals).

Under several `relay serve` workers each process has its own registry and Prometheus scrapes whichever
answers; counters are per process. The document gauges are read from PostgreSQL at scrape time, so they
are the same whichever worker answers.
"""

from __future__ import annotations

import dataclasses

import prometheus_client as prom


@dataclasses.dataclass(frozen=True)
class Metrics:
    registry: prom.CollectorRegistry
    webhooks: prom.Counter
    webhook_seconds: prom.Histogram
    documents: prom.Gauge

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)


def create() -> Metrics:
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
        documents=prom.Gauge(
            "relay_documents",
            "Documents by state (in_doubt needs an operator)",
            ["state"],
            registry=registry,
        ),
    )
