"""Worker variants to compare against the current one with `python -m bench.ab`.

EveryWriteWorker is QueueWorker with rq's bookkeeping as it was before the benchmark's first fix:
every rq heartbeat and every worker-state write goes to Redis (three heartbeats' round trips and
one state write more per item).
"""

from __future__ import annotations

import contextlib
from typing import Any

from rq.worker import SimpleWorker

from workers.worker import REDIS_DOWN, QueueWorker


class EveryWriteWorker(QueueWorker):
    def heartbeat(self, *args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            SimpleWorker.heartbeat(self, *args, **kwargs)

    def set_state(self, *args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            SimpleWorker.set_state(self, *args, **kwargs)
