"""Processors of the batching and concurrency stories: what each item's result says is what a test checks.

`Batches.process_batch` answers each body by what it says: `ok` -> {"batch", "position", "body"}, `fail` ->
a ValueError in its place, `reject` -> (b"rejected", 422), `boom` -> the whole call raises, `sleep:<s>` ->
the call sleeps that long first.
"""

from __future__ import annotations

import time
from typing import Any


class Batches:
    def process_batch(self, data: list[bytes]) -> list[Any]:
        bodies = [body.decode() for body in data]
        if "boom" in bodies:
            raise RuntimeError("the whole batch failed")
        time.sleep(max([float(b.split(":", 1)[1]) for b in bodies if b.startswith("sleep:")] or [0]))
        results: list[Any] = []
        for position, body in enumerate(bodies):
            if body == "fail":
                results.append(ValueError(f"no good: item {position}"))
            elif body == "reject":
                results.append((b"rejected", 422))
            else:
                results.append({"batch": len(bodies), "position": position, "body": body})
        return results


class Lists:
    """No `process_batch`: it declares that its `process` takes the list of bodies."""

    accepts_batches = True

    def process(self, data: list[bytes]) -> list[dict[str, int]]:
        return [{"batch": len(data)} for _ in data]


class ThreadSafeSleep:
    """A sync processor that may run in threads: one process holds worker_threads of its requests."""

    thread_safe = True

    def process(self, data: bytes) -> dict[str, float]:
        seconds = float(data)
        time.sleep(seconds)
        return {"slept": seconds}
