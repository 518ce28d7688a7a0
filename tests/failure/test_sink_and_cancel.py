"""Promises 6 and 7: a full sink stops intake until clients consume; a deleted item never runs or is stopped."""

from __future__ import annotations

import threading
import time

import pytest

from queue_service.store import keys
from tests.failure.harness import Stack, wait_until

pytestmark = pytest.mark.integration

SINK_MAX = 3  # queue.sink.max_length of `tiny-sink`


def test_full_sink_stops_intake_and_consuming_resumes_it(stack: Stack) -> None:
    stack.start_api()
    stack.start_workers(2, "tiny-sink")
    sink = keys.sink_queue("tiny-sink").normal
    longest = 0
    watching = threading.Event()

    def watch_sink() -> None:
        nonlocal longest
        while not watching.is_set():
            longest = max(longest, int(stack.store.xlen(sink)))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_sink)
    watcher.start()
    try:
        request_ids = [stack.put("tiny-sink", sleep=0.2).request_id for _ in range(8)]
        wait_until(lambda: stack.store.xlen(sink) == SINK_MAX, 10, "the sink full")
        time.sleep(2)  # workers poll: they must still leave the rest of the input alone
        assert stack.input_left("tiny-sink") == 8 - SINK_MAX
        assert len(stack.runs()) == SINK_MAX
        for request_id in request_ids:  # a client consumes results: intake resumes
            assert stack.take_result("tiny-sink", request_id, timeout=10) is not None
    finally:
        watching.set()
        watcher.join()
    assert longest <= SINK_MAX
    assert stack.audit() == {200: 8}


def test_deleting_a_queued_request_means_it_never_runs(stack: Stack) -> None:
    stack.start_api()
    stack.start_worker("work")
    stack.put("work", sleep=2)
    wait_until(stack.running, 10, "the worker busy")
    queued = stack.put("work", sleep=0)
    stack.delete("work", queued.index)
    stack.withdrawn.add(queued.request_id)
    after = stack.put("work", sleep=0)
    stack.wait_settled(10)
    assert queued.token not in stack.runs()
    assert after.token in stack.runs()
    assert stack.audit() == {200: 2, 0: 1}


def test_deleting_a_running_request_stops_it_and_the_sink_says_cancelled(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker("work")
    running = stack.put("work", sleep=3600)
    wait_until(stack.running, 10, "the request started")
    deleted_at = time.time()
    stack.delete("work", running.index)
    stack.wait_settled(10)
    [item] = stack.sink_items("work")
    assert item.request_id == running.request_id
    assert item.last_code == 499
    assert "cancelled" in item.message
    [run] = stack.runs()[running.token]
    assert run.outcome == "raised"
    print(f"\nRELIABILITY running request stopped {run.ended - deleted_at:.2f} s after its delete")
    after = stack.put("work", sleep=0)  # the worker goes on
    stack.wait_settled(10)
    assert [r.pid for r in stack.runs()[after.token]] == [worker.pid]
    assert stack.audit() == {499: 1, 200: 1}
