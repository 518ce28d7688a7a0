"""Batches under failure: a worker killed holding a batch hands every item over; a cancel stops one item only.

`batched` runs tests/failure/processors.py:BatchChaos with `max_batch_size: 4` and a 2 s lease.
"""

from __future__ import annotations

import json

import pytest

from tests.failure.harness import Stack, wait_until

pytestmark = pytest.mark.integration

BATCH = 4


def test_a_worker_killed_holding_a_batch_hands_every_item_over_and_each_ends_once(stack: Stack) -> None:
    stack.start_api()
    # Put before any worker runs: the first take finds them all, so the batches are full.
    puts = [stack.put("batched", sleep=2) for _ in range(2 * BATCH)]
    doomed = stack.start_worker("batched")
    wait_until(lambda: len(stack.open_runs().get(doomed.pid, [])) == BATCH, 20, "a batch of 4 running")
    in_batch = set(stack.open_runs()[doomed.pid])
    doomed.kill()
    rescuer = stack.start_worker("batched")
    stack.wait_settled(40)

    assert stack.audit() == {200: 2 * BATCH}
    runs = stack.runs()
    for token in in_batch:  # each item of the killed batch ran once more, in the live worker
        assert [run.pid for run in runs[token]] == [doomed.pid, rescuer.pid]
    results = {item.request_id: json.loads(item.data) for item in stack.sink_items("batched")}
    assert {result["batch"] for result in results.values()} <= {BATCH}
    assert {p.request_id for p in puts} == set(results)


def test_cancelling_one_item_of_a_running_batch_cancels_that_item_only(stack: Stack) -> None:
    stack.start_api()
    puts = [stack.put("batched", sleep=3) for _ in range(BATCH)]
    worker = stack.start_worker("batched")
    wait_until(lambda: len(stack.open_runs().get(worker.pid, [])) == BATCH, 20, "the batch running")
    cancelled = puts[1]
    stack.delete("batched", cancelled.index)
    stack.wait_settled(20)

    assert stack.audit() == {200: BATCH - 1, 499: 1}
    by_request = {item.request_id: item for item in stack.sink_items("batched")}
    assert by_request[cancelled.request_id].last_code == 499
    assert "cancelled" in by_request[cancelled.request_id].message
    for put in puts:
        if put is not cancelled:  # the rest of the batch finished, together
            assert json.loads(by_request[put.request_id].data)["batch"] == BATCH
