"""What the benchmark runs: no-op and time-stamping work, for our workers and for plain RQ workers alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator


def noop() -> None:
    """Plain RQ's no-op job (our side runs workers.examples:Echo)."""


def stamp() -> float:
    """Plain RQ's job for result delivery: the wall-clock time at which the job returns."""
    return time.time()


class EchoOrSleep:
    """Our echo service's processor: echoes the body; a body starting with "s" gets 10 ms of blocking work
    first (`bench.ab`'s short-items row, like the peers harness's W2-sleep)."""

    def initialize(self) -> None:
        """Nothing to load."""

    def process(self, data: bytes) -> bytes:
        if data[:1] == b"s":
            time.sleep(0.01)
        return data


class Stamp:
    """Our processor for result delivery: the body is the wall-clock time at which `process` returns."""

    def initialize(self) -> None:
        """Nothing to load."""

    def process(self, data: bytes) -> bytes:
        return repr(time.time()).encode()


class StampStream:
    """Streams like an LLM for the streaming benchmark: body "N D [W]" yields N chunks D ms apart (the first
    after W ms), each the wall-clock time of its `yield` (async: one process holds `worker_threads` at once)."""

    def initialize(self) -> None:
        """Nothing to load."""

    async def process(self, data: bytes) -> AsyncIterator[str]:
        count, delay_ms, wait_ms = [*(float(word) for word in data.split()), 0.0][:3]
        await asyncio.sleep(wait_ms / 1000)
        for i in range(int(count)):
            if i:
                await asyncio.sleep(delay_ms / 1000)
            yield repr(time.time())


class Burst:
    """Body "N": yields N one-byte text chunks as fast as it can."""

    def initialize(self) -> None:
        """Nothing to load."""

    def process(self, data: bytes) -> Iterator[str]:
        for _ in range(int(data)):
            yield "x"
