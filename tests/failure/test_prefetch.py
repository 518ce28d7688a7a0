"""A busy worker's reserve (prefetch): with a backlog of short items it holds the next item while one runs and
writes each result in the background; with a backlog of very short (no-op) items it takes a chain of a few
and writes their results together. What a user checks: every item runs once and in order, a worker holds at
most one item ahead (a chain's few for no-op items), an item that turns out long does not keep the next one
from a free worker, nor the results of the chain's items before it. (A stop in the middle:
`test_worker_stop.py`.)"""

from __future__ import annotations

import threading
import time

import pytest
import redis

from queue_service.store import keys
from queue_service.store.keys import WORKER_GROUP
from tests.failure.harness import Stack, wait_until
from workers.worker import CHAIN_MAX_ITEMS

pytestmark = pytest.mark.integration

LEASE_SECONDS = 10  # of `work10`: an item left to lapse would wait this long for another worker


class PendingSampler(threading.Thread):
    """The most items the worker group held at once, sampled from Redis while the backlog runs."""

    def __init__(self, stack: Stack, service: str) -> None:
        super().__init__(daemon=True)
        self.store = stack.store
        self.stream = keys.input_queue(service).normal
        self.most = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                summary = self.store.xpending(self.stream, WORKER_GROUP)
            except redis.ResponseError:  # no group before the first worker made it
                pass
            else:
                self.most = max(self.most, int(summary["pending"]))
            time.sleep(0.002)


def most_held_while_a_backlog_runs(stack: Stack, prefetch: str, sleep: float) -> int:
    """Put 60 items (work10's queue holds 64) that sleep `sleep` s each, let one worker run them, and check that
    each ran once, in the order they were put; the most items the worker held at once."""
    stack.start_api()
    tokens = [stack.put("work10", sleep=sleep).token for _ in range(60)]
    sampler = PendingSampler(stack, "work10")
    sampler.start()
    stack.start_worker("work10", env={"QS_WORKER_PREFETCH": prefetch})
    stack.wait_settled(90)
    sampler.done.set()
    sampler.join()
    runs = stack.runs()
    assert all(len(runs[token]) == 1 for token in tokens)  # each ran once
    started = [runs[token][0].started for token in tokens]
    assert started == sorted(started)  # in the order they were put
    assert stack.audit() == {200: len(tokens)}
    return sampler.most


@pytest.mark.parametrize("prefetch", ["true", "false"])
def test_a_backlog_of_short_items_runs_once_each_in_order_with_at_most_one_item_held_ahead(
    stack: Stack, prefetch: str
) -> None:
    # On: the item in hand and one in reserve (the sampler saw it); off: one at a time.
    assert most_held_while_a_backlog_runs(stack, prefetch, sleep=0.03) == (2 if prefetch == "true" else 1)


@pytest.mark.parametrize("prefetch", ["true", "false"])
def test_a_backlog_of_no_op_items_is_taken_in_chains_and_runs_once_each_in_order(stack: Stack, prefetch: str) -> None:
    most = most_held_while_a_backlog_runs(stack, prefetch, sleep=0)
    # Only a chain holds more than 2 (the item in hand and a reserve); at most one is taken behind a chain. (How
    # many items run chained depends on the load: an item over 1 ms on a busy machine is not chained.)
    if prefetch == "true":
        assert 3 <= most <= CHAIN_MAX_ITEMS + 1
    else:
        assert most == 1


def test_results_deferred_in_a_chain_do_not_wait_for_a_long_item_behind_them(stack: Stack) -> None:
    stack.start_api()
    # Fifteen items waiting: the worker takes one, then chains of 4 (items 2-5 and 6-9), then of 3: item 10,
    # the long item 11 and item 12. Item 10's result is deferred to the chain's end, behind the long item.
    before = [stack.put("work10") for _ in range(10)]
    long = stack.put("work10", sleep=20)
    after = [stack.put("work10") for _ in range(4)]
    worker = stack.start_worker("work10")
    wait_until(lambda: stack.running().get(worker.pid) == long.token, 30, "the long item started")
    # Written by the worker while the long item runs (the lease keeper's tick hands them to the finisher).
    wait_until(lambda: all(p.request_id in stack.results() for p in before), 10, "the results put before it")
    assert stack.running().get(worker.pid) == long.token
    stack.wait_settled(90)
    runs = stack.runs()
    assert all(len(runs[p.token]) == 1 for p in [*before, long, *after])
    assert stack.audit() == {200: 15}


def test_an_item_in_reserve_behind_a_long_one_is_handed_back_to_a_free_worker(stack: Stack) -> None:
    stack.start_api()
    short = [stack.put("work10", sleep=0.05).token for _ in range(3)]
    long = stack.put("work10", sleep=20).token
    after = stack.put("work10", sleep=0).token  # taken ahead while `long` runs
    first = stack.start_worker("work10")
    wait_until(lambda: stack.running().get(first.pid) == long, 30, "the long item started")
    second = stack.start_worker("work10")
    ready_at = time.time()
    stack.wait_settled(60)
    runs = stack.runs()
    # Handed back within about a second: run once, by the free worker, while the long item still ran (not
    # after it, and not after its 10 s lease lapsed, when both workers would run it).
    assert [run.pid for run in runs[after]] == [second.pid]
    [long_run], [after_run] = runs[long], runs[after]
    assert long_run.ended is not None and after_run.ended is not None
    assert after_run.ended < long_run.ended
    assert after_run.started - ready_at < LEASE_SECONDS / 2  # free when the second worker came, not lapsing later
    assert all(len(runs[token]) == 1 for token in short)
    assert stack.audit() == {200: 5}
