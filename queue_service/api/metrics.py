"""Prometheus metrics: what this API process counts, plus queue state read from Redis at scrape time.

Request counts and latencies are per API process (Prometheus sums them across processes).
Queue gauges and the worker-side histograms (queue wait, processing, total) are cluster-wide:
they are read from Redis, where every worker records its timings (`consumer.finish`).
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from queue_service.config import ServicesFile
from queue_service.store import keys
from queue_service.store.queues import QueueStore
from queue_service.timings import HISTOGRAMS, bucket_bounds

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "queue_service_requests",
            "HTTP requests by service, operation and final status code (450, 429, 408, 499 included)",
            ["service", "operation", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "queue_service_request_duration_seconds",
            "HTTP request duration by service and operation (sync: queue wait + processing)",
            ["service", "operation"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.waiting = self._service_gauge("waiting_items", "Input items waiting for a worker")
        self.in_flight = self._service_gauge("in_flight_items", "Input items held by workers")
        self.oldest_age = self._service_gauge("oldest_waiting_age_seconds", "Age of the oldest item in the input queue")
        self.live_workers = self._service_gauge("live_workers", "Workers with a recent heartbeat")
        self.sink_items = self._service_gauge("sink_items", "Results waiting in the sink")
        self.sink_bytes = self._service_gauge("sink_bytes", "Bytes of result data waiting in the sink")
        self.backlog_per_worker = self._service_gauge(
            "backlog_per_worker", "Waiting items per live worker (all of them when none): the scaling signal"
        )
        self._histograms: list[HistogramMetricFamily] = []
        self._webhooks: list[GaugeMetricFamily | CounterMetricFamily] = []
        self.registry.register(self)  # collect() below adds the Redis-backed histograms

    def _service_gauge(self, name: str, help_: str) -> Gauge:
        return Gauge(f"queue_service_{name}", help_, ["service"], registry=self.registry)

    def observe_request(self, service: str, operation: str, status: int, seconds: float) -> None:
        self.requests.labels(service, operation, str(status)).inc()
        self.request_seconds.labels(service, operation).observe(seconds)

    def collect(self):  # type: ignore[no-untyped-def]
        yield from self._histograms
        yield from self._webhooks

    def describe(self):  # type: ignore[no-untyped-def]
        return []

    async def refresh(self, store: QueueStore, services: ServicesFile) -> None:
        """Read the queue state of every service from Redis (called per scrape)."""
        now = time.time()
        histograms = {
            name: HistogramMetricFamily(f"queue_service_{name}_seconds", help_, labels=["service"])
            for name, help_ in HISTOGRAMS.items()
        }
        for service in services.services:
            name = service.name
            inputs = await store.state(keys.input_queue(name))
            sink = await store.state(keys.sink_queue(name))
            decoded = await store.timings(name)
            self.waiting.labels(name).set(inputs.waiting)
            self.in_flight.labels(name).set(inputs.in_flight)
            self.oldest_age.labels(name).set(max(0.0, now - inputs.oldest_put) if inputs.oldest_put else 0)
            self.live_workers.labels(name).set(inputs.live_workers)
            self.sink_items.labels(name).set(sink.length)
            self.sink_bytes.labels(name).set(sink.bytes)
            self.backlog_per_worker.labels(name).set(inputs.backlog_per_worker)
            for hist_name, family in histograms.items():
                cumulative, buckets = 0.0, []
                for bound in bucket_bounds():
                    cumulative += decoded.get(f"{hist_name}:{bound}", 0.0)
                    buckets.append((str(bound), cumulative))
                cumulative += decoded.get(f"{hist_name}:+Inf", 0.0)
                buckets.append(("+Inf", cumulative))
                family.add_metric([name], buckets, decoded.get(f"{hist_name}:sum", 0.0))
        self._histograms = list(histograms.values())
        self._webhooks = await _webhook_families(store, services)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


async def _webhook_families(store: QueueStore, services: ServicesFile) -> list[GaugeMetricFamily | CounterMetricFamily]:
    """Webhook deliveries per service (queued, scheduled, dead letters) and attempts by outcome, cluster-wide."""
    deliveries = GaugeMetricFamily(
        "queue_service_webhook_deliveries",
        "Webhook deliveries: queued (not yet taken), scheduled (in flight or retrying), dead (dead letters)",
        labels=["service", "state"],
    )
    attempts = CounterMetricFamily(
        "queue_service_webhook_attempts",
        "Webhook attempts by outcome: delivered, failed, gone (410), dead (last attempt failed)",
        labels=["service", "outcome"],
    )
    for service in services.services:
        if service.webhook is None:
            continue
        counts = await store.webhook_counts(service.name)
        for state, value in (("queued", counts.queued), ("scheduled", counts.scheduled), ("dead", counts.dead)):
            deliveries.add_metric([service.name, state], value)
        for outcome, total in (
            ("delivered", counts.delivered),
            ("failed", counts.failed),
            ("gone", counts.gone),
            ("dead", counts.dead_total),
        ):
            attempts.add_metric([service.name, outcome], total)
    return [deliveries, attempts]
