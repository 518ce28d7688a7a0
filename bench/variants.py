"""Worker variants to compare against the current one with `python -m bench.ab`.

EveryWriteWorker is QueueWorker with rq's bookkeeping as it was before the benchmark's first fix:
every rq heartbeat and every worker-state write goes to Redis (three heartbeats' round trips and
one state write more per item).

TwoTripWorker is QueueWorker before a finish took the next item in its round trip: with a backlog,
a finish and then a take, two round trips per item.

OneAtATimeWorker is QueueWorker without prefetch (QS_WORKER_PREFETCH=false): one item held at a time, each
result written before the next item runs (the finish still takes the next item in its round trip).
"""

from __future__ import annotations

import contextlib
from typing import Any

from rq.worker import SimpleWorker

from workers.plan import ServicePlan
from workers.results import NextTake
from workers.worker import REDIS_DOWN, QueueWorker


class EveryWriteWorker(QueueWorker):
    def heartbeat(self, *args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            SimpleWorker.heartbeat(self, *args, **kwargs)

    def set_state(self, *args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            SimpleWorker.set_state(self, *args, **kwargs)


class TwoTripWorker(QueueWorker):
    def _next_take_after(self, plan: ServicePlan) -> NextTake | None:
        return None


class OneAtATimeWorker(QueueWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prefetch = False
