"""Fault injection for failure tests: a named checkpoint kills this process when asked to.

`QS_FAULTS=put.stored` makes the API SIGKILL itself right after a put is stored and before it
answers, so a test can kill it between the steps of a put deterministically instead of by
timing luck. Unset in production: one environment lookup per checkpoint, cached.
"""

from __future__ import annotations

import os
import signal
from functools import cache


@cache
def _armed() -> frozenset[str]:
    return frozenset(name.strip() for name in os.environ.get("QS_FAULTS", "").split(",") if name.strip())


def checkpoint(name: str) -> None:
    if name in _armed():
        os.kill(os.getpid(), signal.SIGKILL)
