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


class Streams:
    """A streaming processor whose body says what it streams:

    `bytes` -> two binary chunks; `json` -> two JSON chunks; `mixed` -> text, bytes, JSON; `fill:<n>:<size>` ->
    n chunks of `size` bytes ("x"), appending to `path` (`fill:<n>:<size>:<path>`) when it is told its output
    is too large; `wait:<s>` -> sleeps s seconds, then one chunk (nothing before); `progress:<n>` -> n progress reports
    through the context, no chunks, then the result "reported"; `fail` -> a chunk, then ValueError.
    """

    def process(self, data: bytes, context: Any) -> Any:
        body = data.decode()
        if body.startswith("progress:"):
            return self._progress(int(body.split(":")[1]), context)
        return self._stream(body)

    def _progress(self, count: int, context: Any) -> str:
        for i in range(count):
            time.sleep(0.05)
            context.progress((i + 1) / count, f"step {i + 1} of {count}")
        return "reported"

    def _stream(self, body: str) -> Any:
        from workers.streaming import StreamTooLarge

        if body == "bytes":
            yield b"\x00\x01\xff"
            yield b"\xfe"
        elif body == "json":
            yield {"token": "a"}
            yield [1, 2]
        elif body == "mixed":
            yield "text "
            yield b"\xff"
            yield {"n": 1}
        elif body.startswith("fill:"):
            _, count, size, marks = body.split(":", 3)
            try:
                for _ in range(int(count)):
                    yield "x" * int(size)
            except StreamTooLarge:
                with open(marks, "a") as out:
                    out.write("told: too large\n")
                raise
        elif body.startswith("wait:"):
            time.sleep(float(body.split(":")[1]))
            yield "late"
        elif body == "fail":
            yield "before the failure "
            raise ValueError("failed mid-stream")
