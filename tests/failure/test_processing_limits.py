"""Promise 5: a processor that hangs or runs too long ends with a terminal item; one stuck in C is replaced."""

from __future__ import annotations

import time

import pytest

from tests.failure.harness import Stack, wait_until

pytestmark = pytest.mark.integration

LIMIT_SECONDS = 2  # queue.max_processing_seconds of `limited`
WATCHDOG_EXTRA_SECONDS = 10  # workers.watchdog.WATCHDOG_EXTRA_SECONDS


def test_processor_running_past_the_limit_ends_with_408_and_the_worker_goes_on(stack: Stack) -> None:
    stack.start_api()
    worker = stack.start_worker("limited")
    hung = stack.put("limited", sleep=3600)
    after = stack.put("limited", sleep=0.1)
    stack.wait_settled(LIMIT_SECONDS + 10)
    [item] = [i for i in stack.sink_items("limited") if i.request_id == hung.request_id]
    assert item.last_code == 408
    assert "max_processing_seconds=2" in item.data.decode()
    assert [r.outcome for r in stack.runs()[hung.token]] == ["raised"]
    assert [r.outcome for r in stack.runs()[after.token]] == ["ok"]
    assert worker.is_running()
    assert stack.audit() == {408: 1, 200: 1}


def test_processor_stuck_in_c_code_gets_its_worker_replaced_and_the_request_goes_on(stack: Stack) -> None:
    stack.start_api()
    stuck = stack.start_worker("limited")
    # sum(range(...)) holds the GIL in one C call: SIGALRM's handler and the lease thread never run.
    token = stack.put("limited", sleep=0.1, once=str(stack.tmp_path / "first"), first={"c_hang": True}).token
    wait_until(stack.running, 10, "the request started")
    stuck_at = time.time()
    rescuer = stack.start_worker("limited")
    stack.wait_settled(15)  # the lease (2 s) lapses: the live worker takes it over
    first, second = stack.runs()[token]
    assert (first.pid, first.outcome) == (stuck.pid, None)
    assert (second.pid, second.outcome) == (rescuer.pid, "ok")
    # The watchdog ends the stuck process (exit 1) at max_processing_seconds + 10 s; a supervisor
    # (`queue-service up`, compose's restart policy) starts a new one.
    assert stuck.wait(LIMIT_SECONDS + WATCHDOG_EXTRA_SECONDS + 10) == 1
    print(f"\nRELIABILITY stuck-in-C worker ended by the watchdog after {time.time() - stuck_at:.1f} s")
    assert "Timeout (0:00:12)!" in stuck.log_text()
    assert stack.audit() == {200: 1}
