"""Worker-side latency histograms kept in Redis, so every worker adds to one cluster-wide histogram.

A worker records each finished item as increments of hash fields (`<histogram>:<bucket>`,
`<histogram>:sum`); `metrics.py` turns them into Prometheus histograms at scrape time.
"""

from __future__ import annotations

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


def increments(queue_wait: float, processing: float, total: float) -> list[str | float]:
    """Flat (field, amount) pairs for one finished item."""
    pairs: list[str | float] = []
    for name, seconds in (("queue_wait", queue_wait), ("processing", processing), ("total", total)):
        pairs += [f"{name}:{bucket_of(seconds)}", 1, f"{name}:sum", round(seconds, 6)]
    return pairs
