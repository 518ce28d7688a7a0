"""Promise 2: a worker stopped with SIGTERM finishes the request in hand, takes no new ones and exits 0."""

from __future__ import annotations

import time

import pytest
from rq.suspension import resume, suspend

from queue_service.store import keys
from queue_service.store.keys import WORKER_GROUP
from tests.failure.harness import Stack, assert_backlog_handed_on, wait_until

pytestmark = pytest.mark.integration

GRACE_SECONDS = 2
LEASE_SECONDS = 10  # of `work10`: an item left to lapse would wait this long for another worker


def test_sigterm_finishes_the_request_in_hand_takes_no_new_one_and_exits_0(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker("work")
    in_hand = stack.put("work", sleep=3).token
    wait_until(stack.running, 10, "the request started")
    queued = [stack.put("work", sleep=0.1).token for _ in range(3)]
    stack.terminate(worker)
    stopped_at = time.time()
    assert worker.wait(30) == 0
    runs = stack.runs()
    assert [run.outcome for run in runs[in_hand]] == ["ok"]
    assert runs[in_hand][0].ended > stopped_at  # it went on after the signal
    assert not any(token in runs for token in queued)  # and took nothing new
    stack.start_worker("work")
    stack.wait_settled(30)
    assert stack.audit() == {200: 4}


def test_sigterm_past_the_grace_period_hands_the_request_back_and_exits_0(stack: Stack) -> None:
    stack.start_api()
    env = {"QS_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS)}
    worker = stack.start_worker("work10", env=env)
    token = stack.put("work10", sleep=0.1, once=str(stack.tmp_path / "first"), first={"sleep": 60}).token
    wait_until(stack.running, 10, "the request started")
    other = stack.start_worker("work10")
    stack.terminate(worker)
    stopped_at = time.time()
    assert worker.wait(GRACE_SECONDS + 20) == 0
    exited_at = time.time()
    assert exited_at - stopped_at < GRACE_SECONDS + 10  # at the end of the grace, not of the 60 s run
    stack.wait_settled(20)
    first, second = stack.runs()[token]
    assert (first.pid, first.outcome) == (worker.pid, "raised")  # stopped at the end of the grace period
    assert (second.pid, second.outcome) == (other.pid, "ok")
    # Handed back, not left to lapse: the other worker took it at once, not after the 10 s lease.
    assert second.started - exited_at < LEASE_SECONDS / 2
    assert stack.audit() == {200: 1}


# With a backlog the finish of one item takes the next in the same round trip (`worker.taken_ahead`); with
# prefetch a finisher thread writes one result and takes the next item while the reserved one runs
# (`worker.finish_behind`); no-op items run in chains whose results are written at the chain's end
# (`worker.result_deferred`: one result kept back, the chain's rest in reserve). A SIGTERM landing at any of
# these points (the checkpoint sends it) must leave every result written and hand back what the worker holds,
# not leave it to wait out its 10 s lease.
# (No-op items: the first item runs 1 s, or the worker would reach the checkpoint before it counts as started.)
@pytest.mark.parametrize(
    ("at", "first", "rest"),
    [("worker.taken_ahead", 0.05, 0.05), ("worker.finish_behind", 0.05, 0.05), ("worker.result_deferred", 1.0, 0)],
)
def test_a_stop_right_after_a_finish_took_the_next_item_hands_that_item_back(
    stack: Stack, at: str, first: float, rest: float
) -> None:
    stack.start_api()
    tokens = [stack.put("work10", sleep=first if i == 0 else rest).token for i in range(12)]
    worker = stack.start_worker("work10", env={"QS_FAULTS": f"{at}=TERM"})
    stack.excused.add(worker.pid)
    assert_backlog_handed_on(stack, worker, "work10", tokens, LEASE_SECONDS)


def test_a_suspended_worker_gives_back_the_item_its_last_finish_took(stack: Stack) -> None:
    # `rq suspend` stops a worker between items; the item its last finish took must not wait out its lease.
    stack.start_api()
    tokens = [stack.put("work10", sleep=0.3).token for _ in range(12)]  # a backlog: each finish takes the next
    worker = stack.start_worker("work10")
    wait_until(lambda: len(stack.runs()) >= 2, 30, "two requests ran")
    suspend(stack.store)
    try:
        state = f"rq:worker:{worker.name}"
        wait_until(lambda: stack.store.hget(state, "state") == b"suspended", 30, "the worker suspended")
        stream = keys.input_queue("work10").normal
        held = stack.store.xpending_range(stream, WORKER_GROUP, "-", "+", 20)
        assert all(entry["time_since_delivered"] >= LEASE_SECONDS * 1000 for entry in held), held
    finally:
        resume(stack.store)
    stack.wait_settled(60)
    runs = stack.runs()
    assert all(len(runs[token]) == 1 for token in tokens)  # none ran twice
    assert stack.audit() == {200: len(tokens)}


def test_an_idle_worker_suspended_takes_nothing_until_resumed(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker("work10")
    suspend(stack.store)
    try:
        state = f"rq:worker:{worker.name}"
        wait_until(lambda: stack.store.hget(state, "state") == b"suspended", 30, "the idle worker suspended")
        token = stack.put("work10", sleep=0.05).token
        time.sleep(3)
        assert token not in stack.runs()  # suspended: it took nothing
    finally:
        resume(stack.store)
    stack.wait_settled(30)
    assert [run.pid for run in stack.runs()[token]] == [worker.pid]
    assert stack.audit() == {200: 1}
