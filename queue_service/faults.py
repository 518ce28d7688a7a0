"""Fault injection for failure tests: a named checkpoint signals this process when asked to.

`QS_FAULTS=put.stored` makes the API SIGKILL itself right after a put is stored and before it
answers, so a test can kill it between the steps of a put deterministically instead of by
timing luck. `name=TERM` sends SIGTERM instead (a stop that lands exactly there). Unset in
production: one environment lookup per checkpoint, cached.
"""

from __future__ import annotations

import os
import signal
from functools import cache


@cache
def _armed() -> dict[str, signal.Signals]:
    armed = {}
    for spec in os.environ.get("QS_FAULTS", "").split(","):
        name, _, how = spec.strip().partition("=")
        if name:
            armed[name] = signal.SIGTERM if how.strip().upper() == "TERM" else signal.SIGKILL
    return armed


def checkpoint(name: str) -> None:
    sent = _armed().get(name)
    if sent is not None:
        os.kill(os.getpid(), sent)
