"""Prometheus metrics, one registry per application (tests and workers never share globals).

Under several `relay serve` workers each process has its own registry and Prometheus scrapes whichever
answers; counters are per process. The document gauges are read from PostgreSQL at scrape time, so they
are the same whichever worker answers.
"""

from __future__ import annotations

import dataclasses

import prometheus_client as prom

from relay import models

CONTENT_TYPE = prom.CONTENT_TYPE_LATEST
DOCUMENT_STATES = tuple(state.value for state in models.DocumentState)


@dataclasses.dataclass(frozen=True)
class Metrics:
    registry: prom.CollectorRegistry
    webhooks: prom.Counter
    webhook_seconds: prom.Histogram
    documents: prom.Gauge
    uploads: prom.Counter

    def webhook(self, outcome: str, seconds: float) -> None:
        """One webhook answered: its outcome (queued, bad_signature, ...) and its duration."""
        self.webhooks.labels(outcome).inc()
        self.webhook_seconds.observe(seconds)

    def upload(self, outcome: str) -> None:
        """One upload attempt to Cegid Loop finished (uploaded, failed, in_doubt, retried...)."""
        self.uploads.labels(outcome).inc()

    def set_documents(self, counts: dict[str, int]) -> None:
        """Documents by state (every state present, zero when none); ``in_doubt`` needs an operator."""
        for state in DOCUMENT_STATES:
            self.documents.labels(state).set(counts.get(state, 0))

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)


def create() -> Metrics:
    """A fresh registry with every metric the relay records (one per application)."""
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
        uploads=prom.Counter(
            "relay_uploads",
            "Upload attempts to Cegid Loop, by outcome",
            ["outcome"],
            registry=registry,
        ),
    )
