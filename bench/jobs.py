"""What the benchmark runs: no-op and time-stamping work, for our workers and for plain RQ workers alike."""

from __future__ import annotations

import time


def noop() -> None:
    """Plain RQ's no-op job (our side runs workers.examples:Echo)."""


def stamp() -> float:
    """Plain RQ's job for result delivery: the wall-clock time at which the job returns."""
    return time.time()


class Stamp:
    """Our processor for result delivery: the body is the wall-clock time at which `process` returns."""

    def initialize(self) -> None:
        """Nothing to load."""

    def process(self, data: bytes) -> bytes:
        return repr(time.time()).encode()
