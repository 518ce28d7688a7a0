"""Watchdog: ends the process when a processor is stuck past its limit in code no signal can stop.

SIGALRM (the main thread) and task cancellation (the event loop) stop Python code at
`queue.max_processing_seconds`; code stuck in C holding the GIL stops neither them nor the lease keeper.
faulthandler's timer is a C thread that needs no GIL: armed at the earliest deadline of all running items
(plus a margin), it dumps the tracebacks and exits the process, whose leases then lapse to other workers
and whose supervisor starts a new one. faulthandler has one timer per process, so this class keeps the
deadlines of every item running at once and re-arms it at the earliest.
"""

from __future__ import annotations

import faulthandler
import itertools
import math
import threading
import time

# Extra time past queue.max_processing_seconds before the watchdog ends a process stuck in C code.
WATCHDOG_EXTRA_SECONDS = 10.0


class Watchdog:
    def __init__(self, extra_seconds: float = WATCHDOG_EXTRA_SECONDS) -> None:
        self.extra_seconds = extra_seconds
        self._deadlines: dict[int, float] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()

    def arm(self, limit_seconds: float) -> int:
        """Watch one run that may take `limit_seconds`; the token disarms it."""
        with self._lock:
            token = next(self._tokens)
            self._deadlines[token] = time.monotonic() + limit_seconds + self.extra_seconds
            self._rearm()
            return token

    def disarm(self, token: int) -> None:
        with self._lock:
            if self._deadlines.pop(token, None) is not None:
                self._rearm()

    def _rearm(self) -> None:
        if not self._deadlines:
            faulthandler.cancel_dump_traceback_later()
            return
        # Whole seconds (rounded up): faulthandler's message then reads `Timeout (0:00:12)!`, the limit + margin.
        left = math.ceil(min(self._deadlines.values()) - time.monotonic())
        faulthandler.dump_traceback_later(max(1, left), exit=True)
