"""Worker-side latency histograms kept in Redis, so that every worker adds to one cluster-wide histogram.

A worker counts each finished item in memory (`TimingCounts`) and adds the counts to hash fields
(`<histogram>:<bucket>`, `<histogram>:sum`) every few seconds, in one pipeline: no Redis work per item.
The API's `/metrics` turns the fields into Prometheus histograms at scrape time.
"""

from __future__ import annotations

import threading
from collections import defaultdict

HISTOGRAMS = {
    "queue_wait": "Time from put to a worker taking the item",
    "processing": "Time the processor ran on one item",
    "total": "Time from put to the result being written",
}
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)


def bucket_bounds() -> tuple[float, ...]:
    return BUCKETS


def bucket_of(seconds: float) -> str:
    for bound in BUCKETS:
        if seconds <= bound:
            return str(bound)
    return "+Inf"


class TimingCounts:
    """Counts of finished items not yet added to Redis, per service (the main thread adds, another drains)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, service: str, queue_wait: float, processing: float, total: float) -> None:
        with self._lock:
            fields = self._counts[service]
            for name, seconds in (("queue_wait", queue_wait), ("processing", processing), ("total", total)):
                fields[f"{name}:{bucket_of(seconds)}"] += 1
                fields[f"{name}:sum"] += round(seconds, 6)

    def drain(self) -> dict[str, dict[str, float]]:
        with self._lock:
            counts, self._counts = self._counts, defaultdict(lambda: defaultdict(float))
        return {service: dict(fields) for service, fields in counts.items()}

    def put_back(self, counts: dict[str, dict[str, float]]) -> None:
        """Counts whose write failed (Redis away) wait for the next flush."""
        with self._lock:
            for service, fields in counts.items():
                for field, amount in fields.items():
                    self._counts[service][field] += amount
