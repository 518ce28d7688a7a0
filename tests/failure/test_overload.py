"""Promise 8: a flood of 10x what the workers can take: the queue keeps its bound, a full queue is
answered 450 at once (never held until there is room), the API stays flat in memory, and afterwards
nothing is stuck. The latencies are printed, not asserted tightly: they measure the machine too.

QS_FLOOD_SECONDS sets how long the flood lasts (default 20 s; the issue's 60 s for the numbers
in docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from queue_service.store import keys
from queue_service.store.keys import WORKER_GROUP
from tests.failure.conftest import FLOOD_BOUND
from tests.failure.harness import Put, Stack

# Heavy on CPU: never beside another flood (see tests/conftest.py for the groups).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("heavy")]

FLOOD_SECONDS = float(os.environ.get("QS_FLOOD_SECONDS", "20"))
WORKERS = 2
ITEM_SECONDS = 0.2
CAPACITY = WORKERS / ITEM_SECONDS  # requests per second the workers can take
RATE = 10 * CAPACITY
WARM_UP_SECONDS = 3.0
# A put held until the workers made room would queue behind them: 9 in 10 of the flood, 200 connections
# held, waits of 20 s. Refused at once, a 450 takes ~3 ms on a quiet machine; the median was 0.5 s (p99
# 3 s) with the suite in parallel beside two CPU hogs. The bound is generous for that, and far from 20 s.
AT_ONCE_SECONDS = 5.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def waiting(store: redis.Redis, qi: keys.QueueKeys) -> int:
    """Items put and not yet taken, read in one transaction (as put.lua counts them)."""
    with store.pipeline(transaction=True) as pipe:
        for stream in qi.streams:
            pipe.xlen(stream)
            pipe.xpending(stream, WORKER_GROUP)
        try:
            high, high_held, normal, normal_held = pipe.execute()
        except redis.ResponseError:  # before the first put: no stream, no group
            return 0
    return high + normal - high_held["pending"] - normal_held["pending"]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def flood(stack: Stack, seconds: float) -> list[tuple[int, float]]:
    """Put RATE requests per second, open loop (a slow answer does not slow the flood down)."""
    answers: list[tuple[int, float]] = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30, limits=limits) as http:

        async def put_one() -> None:
            token, body = stack.order(sleep=ITEM_SECONDS)
            started = time.monotonic()
            answer = await http.post("/api/predict/flood", content=body)
            answers.append((answer.status_code, time.monotonic() - started))
            stack.record(Put("flood", token, answer))

        start = time.monotonic()
        tasks = []
        for i in range(int(seconds * RATE)):
            await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))
            tasks.append(asyncio.create_task(put_one()))
        await asyncio.gather(*tasks)
    return answers


def test_flood_of_10x_capacity_keeps_the_bound_refuses_at_once_and_memory_stays_flat(stack: Stack) -> None:
    stack.start_api()
    stack.start_workers(WORKERS, "flood")
    api_pid = stack.apis[0].pid
    qi = keys.input_queue("flood")
    most_waiting = 0
    rss_samples: list[tuple[float, int]] = []
    flooding = threading.Event()

    def sample() -> None:  # the queue's length and the API's memory, all through the flood
        nonlocal most_waiting
        while not flooding.is_set():
            most_waiting = max(most_waiting, waiting(stack.store, qi))
            rss_samples.append((time.monotonic(), rss_kib(api_pid)))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    started = time.monotonic()
    sampler.start()
    try:
        answers = asyncio.run(flood(stack, FLOOD_SECONDS))
    finally:
        flooding.set()
        sampler.join()
    statuses = [status for status, _ in answers]
    full = [latency for status, latency in answers if status == 450]
    everything = [latency for _, latency in answers]
    warm = [kib for at, kib in rss_samples if at - started >= WARM_UP_SECONDS]
    rss_before, rss_after, rss_peak = warm[0], warm[-1], max(warm)
    assert full, f"the flood never met a full queue: {Counter(statuses)}"
    p99_full = percentile(full, 0.99)
    print(
        f"\nRELIABILITY flood {FLOOD_SECONDS:g} s at {RATE:g}/s (workers take {CAPACITY:g}/s): "
        f"{len(answers)} answers, {statuses.count(200)} accepted, {len(full)} x 450; "
        f"450 latency p50 {statistics.median(full) * 1000:.1f} ms, p99 {p99_full * 1000:.1f} ms, "
        f"max {max(full) * 1000:.1f} ms; all answers p99 {percentile(everything, 0.99) * 1000:.1f} ms; "
        f"most waiting {most_waiting} (bound {FLOOD_BOUND}); "
        f"API RSS {rss_before / 1024:.1f} MiB after warm-up, {rss_after / 1024:.1f} MiB at the end, "
        f"peak {rss_peak / 1024:.1f} MiB"
    )
    assert set(statuses) <= {200, 450}
    assert len(answers) == int(FLOOD_SECONDS * RATE)
    assert most_waiting <= FLOOD_BOUND
    assert statistics.median(full) < AT_ONCE_SECONDS, "450s waited: the full queue held puts instead of refusing"
    assert rss_after - rss_before < 16 * 1024  # flat: no growth with the number of requests
    stack.wait_settled(60)  # afterwards the accepted ones all complete: nothing stuck
    assert stack.audit() == {200: statuses.count(200)}
