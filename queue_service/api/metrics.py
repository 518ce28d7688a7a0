"""Prometheus metrics: what this API process counts, plus queue state read from Redis at scrape time.

Request counts and latencies are per API process. Several processes of one API (`up --api-workers N`, uvicorn
workers sharing a port, so a scrape reaches any one of them) count in prometheus_client's multiprocess mode:
with `PROMETHEUS_MULTIPROC_DIR` set, each process writes its counters to a file there, and a scrape of any
process sums every process's files. Replicas on separate hosts are scraped one by one and summed by
Prometheus (`sum by (service, operation, status)`), as usual.
Queue gauges and the worker-side histograms (queue wait, processing, total) are cluster-wide: they are read
from Redis at each scrape, where every worker records its timings (`consumer.finish`), so any process
answers the same and they are never summed across processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from queue_service.config import ServicesFile
from queue_service.store import keys
from queue_service.store.queues import QueueStore
from queue_service.timings import HISTOGRAMS, bucket_bounds

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Queue state per service, from Redis: metric name (after `queue_service_`) -> help.
GAUGES = {
    "waiting_items": "Input items waiting for a worker",
    "in_flight_items": "Input items held by workers",
    "oldest_waiting_age_seconds": "Age of the oldest item in the input queue",
    "live_workers": "Workers with a recent heartbeat",
    "sink_items": "Results waiting in the sink",
    "sink_bytes": "Bytes of result data waiting in the sink",
    "backlog_per_worker": "Waiting items per live worker (all of them when none): the scaling signal",
}


def multiprocess() -> bool:
    """Whether this process counts in prometheus_client's multiprocess mode (read when prometheus_client loads)."""
    return bool(os.environ.get(MULTIPROC_DIR_ENV))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # In multiprocess mode these write to this process's files; a scrape reads every process's files.
        counted_in = None if multiprocess() else self.registry
        self.requests = Counter(
            "queue_service_requests",
            "HTTP requests by service, operation and final status code (450, 429, 408, 499 included)",
            ["service", "operation", "status"],
            registry=counted_in,
        )
        self.request_seconds = Histogram(
            "queue_service_request_duration_seconds",
            "HTTP request duration by service and operation (sync: queue wait + processing)",
            ["service", "operation"],
            buckets=REQUEST_BUCKETS,
            registry=counted_in,
        )
        if multiprocess():
            MultiProcessCollector(self.registry)
        # Each label set's counter and histogram, found once: `labels()` per request cost ~2 % of a put (issue 17).
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._from_redis: list[Metric] = []
        self.registry.register(self)  # collect() below adds what the last refresh read from Redis

    def observe_request(self, service: str, operation: str, status: int, seconds: float) -> None:
        children = self._children.get((service, operation, status))
        if children is None:
            children = (
                self.requests.labels(service, operation, str(status)),
                self.request_seconds.labels(service, operation),
            )
            self._children[(service, operation, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def collect(self) -> Iterator[Metric]:
        yield from self._from_redis

    def describe(self) -> list[Metric]:
        return []

    async def refresh(self, store: QueueStore, services: ServicesFile) -> None:
        """Read the queue state of every service from Redis (called per scrape)."""
        now = time.time()
        gauges = {
            name: GaugeMetricFamily(f"queue_service_{name}", help_, labels=["service"])
            for name, help_ in GAUGES.items()
        }
        histograms = {
            name: HistogramMetricFamily(f"queue_service_{name}_seconds", help_, labels=["service"])
            for name, help_ in HISTOGRAMS.items()
        }
        for service in services.services:
            name = service.name
            inputs = await store.state(keys.input_queue(name))
            sink = await store.state(keys.sink_queue(name))
            decoded = await store.timings(name)
            values = {
                "waiting_items": inputs.waiting,
                "in_flight_items": inputs.in_flight,
                "oldest_waiting_age_seconds": max(0.0, now - inputs.oldest_put) if inputs.oldest_put else 0,
                "live_workers": inputs.live_workers,
                "sink_items": sink.length,
                "sink_bytes": sink.bytes,
                "backlog_per_worker": inputs.backlog_per_worker,
            }
            for gauge_name, value in values.items():
                gauges[gauge_name].add_metric([name], value)
            for hist_name, family in histograms.items():
                cumulative, buckets = 0.0, []
                for bound in bucket_bounds():
                    cumulative += decoded.get(f"{hist_name}:{bound}", 0.0)
                    buckets.append((str(bound), cumulative))
                cumulative += decoded.get(f"{hist_name}:+Inf", 0.0)
                buckets.append(("+Inf", cumulative))
                family.add_metric([name], buckets, decoded.get(f"{hist_name}:sum", 0.0))
        self._from_redis = [*gauges.values(), *histograms.values(), *(await _webhook_families(store, services))]

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
