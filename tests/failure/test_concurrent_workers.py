"""One worker process holding several requests at once (an async processor): leases, cancellation, the
processing limit, a stop's grace period and the C-stuck watchdog each work per request.

`parallel` runs tests/failure/processors.py:AsyncChaos with `worker_threads: 4`, a 2 s lease and
`max_processing_seconds: 4`.
"""

from __future__ import annotations

import json
import time

import pytest

from queue_service.store import keys
from tests.failure.harness import Run, Stack, wait_until

pytestmark = pytest.mark.integration

THREADS = 4
LIMIT_SECONDS = 4
WATCHDOG_EXTRA_SECONDS = 10  # workers.watchdog.WATCHDOG_EXTRA_SECONDS


def most_at_once(runs: list[Run]) -> int:
    """The largest number of these runs that were going on at the same moment."""
    events = sorted([(r.started, 1) for r in runs] + [(r.ended or float("inf"), -1) for r in runs])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_one_process_holds_worker_threads_requests_at_once_and_says_which(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker("parallel")
    puts = [stack.put("parallel", sleep=3) for _ in range(2 * THREADS)]
    wait_until(lambda: len(stack.open_runs().get(worker.pid, [])) == THREADS, 20, "4 requests running")

    def published() -> list[dict]:
        raw = stack.store.hget(keys.running("parallel"), worker.name)
        return json.loads(raw) if raw else []

    wait_until(lambda: len(published()) == THREADS, 10, "the worker's running field listing 4 items")
    held = published()
    assert {entry["requestId"] for entry in held} <= {p.request_id for p in puts}
    assert all(entry["deliveries"] == 1 and entry["startedAt"] > 0 for entry in held)
    stack.wait_settled(30)

    assert stack.audit() == {200: 2 * THREADS}
    runs = [run for token_runs in stack.runs().values() for run in token_runs]
    assert {run.pid for run in runs} == {worker.pid}
    assert most_at_once(runs) == THREADS  # never more than worker_threads, and that many at once
    wait_until(lambda: published() == [], 5, "the running field gone once it holds nothing")


def test_cancelling_one_request_in_flight_stops_that_one_only(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker("parallel")
    puts = [stack.put("parallel", sleep=3) for _ in range(THREADS)]
    wait_until(lambda: len(stack.open_runs().get(worker.pid, [])) == THREADS, 20, "all 4 running")
    cancelled = puts[2]
    stack.delete("parallel", cancelled.index)
    stack.wait_settled(20)

    assert stack.audit() == {200: THREADS - 1, 499: 1}
    [item] = [i for i in stack.sink_items("parallel") if i.request_id == cancelled.request_id]
    assert item.last_code == 499 and "cancelled" in item.message
    runs = stack.runs()
    assert [run.outcome for run in runs[cancelled.token]] == ["raised"]  # its task was stopped
    assert all(runs[p.token][0].outcome == "ok" for p in puts if p is not cancelled)


def test_a_request_past_max_processing_seconds_ends_with_408_and_the_others_go_on(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker("parallel")
    slow = stack.put("parallel", sleep=3600)
    quick = [stack.put("parallel", sleep=0.5) for _ in range(3)]
    stack.wait_settled(LIMIT_SECONDS + 15)

    assert stack.audit() == {200: 3, 408: 1}
    [item] = [i for i in stack.sink_items("parallel") if i.request_id == slow.request_id]
    assert "max_processing_seconds=4" in item.message
    assert all(stack.runs()[p.token][0].outcome == "ok" for p in quick)


@pytest.mark.quiet  # a 2 s grace window
def test_sigterm_lets_requests_in_flight_finish_and_hands_back_those_past_the_grace(stack: Stack) -> None:
    stack.start_api()
    grace = 2
    worker = stack.start_worker("parallel", env={"QS_SHUTDOWN_GRACE_SECONDS": str(grace)})
    short = [stack.put("parallel", sleep=1) for _ in range(2)]
    long = [
        stack.put("parallel", sleep=0.1, once=str(stack.tmp_path / f"first-{n}"), first={"sleep": 60}) for n in range(2)
    ]
    wait_until(lambda: len(stack.open_runs().get(worker.pid, [])) == 4, 20, "all 4 running")
    stack.terminate(worker)
    stopped_at = time.time()
    assert worker.wait(grace + 20) == 0
    assert time.time() - stopped_at < grace + 10  # at the end of the grace, not of the 60 s runs
    runs = stack.runs()
    assert all([run.outcome for run in runs[p.token]] == ["ok"] for p in short)  # finished after the signal
    assert all([run.outcome for run in runs[p.token]] == ["raised"] for p in long)  # stopped at the grace end
    stack.start_worker("parallel")
    stack.wait_settled(20)
    assert stack.audit() == {200: 4}


def test_a_request_stuck_in_c_code_ends_its_process_and_every_request_it_held_goes_on(stack: Stack) -> None:
    stack.start_api()
    stuck = stack.start_worker("parallel")
    hang = stack.put("parallel", sleep=0.1, once=str(stack.tmp_path / "first"), first={"c_hang": True})
    wait_until(lambda: stack.open_runs().get(stuck.pid), 20, "the request stuck")
    others = [stack.put("parallel", sleep=0.1) for _ in range(2)]  # taken, then stuck behind the blocked loop
    time.sleep(0.5)
    rescuer = stack.start_worker("parallel")
    stack.wait_settled(30)  # the leases (2 s) lapse: the live worker takes them all over
    assert stuck.wait(LIMIT_SECONDS + WATCHDOG_EXTRA_SECONDS + 10) == 1
    assert "Timeout (0:00:14)!" in stuck.log_text()
    runs = stack.runs()
    assert runs[hang.token][-1].pid == rescuer.pid
    assert all(runs[p.token][-1].pid == rescuer.pid for p in others)
    assert stack.audit() == {200: 3}
