"""Promise 4: Redis restarted (AOF on) loses no accepted request; while it is away the API answers 503."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx
import pytest

from queue_service.config import load_services
from queue_service.store.consumer import WorkerStore
from tests.failure.conftest import LEASE_SECONDS
from tests.failure.harness import Stack, wait_until
from workers.worker import take_rules

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 10
# No call may hang on the missing Redis: each answers 503 well inside the client's 30 s timeout
# (0.7 s at most on a quiet machine, generous for a loaded one).
HANG_SECONDS = 10


def test_redis_killed_and_restarted_with_aof_loses_no_accepted_request(stack: Stack) -> None:
    stack.start_api()
    workers = stack.start_workers(2, "work")
    long_one = stack.put("work", sleep=6).token  # runs across the restart; its worker keeps it
    for _ in range(12):
        assert stack.put("work", sleep=0.4).status_code == 200
    wait_until(lambda: len(stack.runs()) >= 3, 10, "work under way")
    stack.redis_server.kill()  # SIGKILL: no shutdown save, only what the AOF already has
    time.sleep(LEASE_SECONDS)  # down for a whole lease: held items look lapsed to a restarted Redis
    stack.redis_server.restart()
    # A consumer that takes at once must not get the long request: its worker lives and will renew.
    probe = WorkerStore(stack.store, "probe")
    taken = probe.take("work", take_rules(load_services(stack.services_file).by_name["work"]), claim=True)
    for item in taken.items:
        probe.release(item)
        assert json.loads(item.data)["token"] != long_one, "a held request was claimed after the restart"
    # The API and the workers reconnect by themselves: new requests are accepted and processed.
    wait_until(lambda: stack.put("work", sleep=0.1).status_code == 200, 20, "the API accepting again")
    for _ in range(4):
        assert stack.put("work", sleep=0.1).status_code == 200
    stack.wait_settled(60)
    assert all(w.is_running() for w in workers)
    assert len(stack.runs()[long_one]) == 1
    assert stack.audit() == {200: len(stack.accepted)}


def test_redis_away_for_10s_gives_503_never_a_hang_or_500_and_everything_recovers(stack: Stack) -> None:
    stack.start_api()
    workers = stack.start_workers(2, "work")
    # One request runs across the whole outage: its worker lives, so it must keep it (lease 3 s).
    long_one = stack.put("work", sleep=OUTAGE_SECONDS + 4).token
    for _ in range(5):
        assert stack.put("work", sleep=1).status_code == 200
    wait_until(lambda: len(stack.running()) == 2, 10, "both workers busy")
    answers: Counter[int] = Counter()
    slowest = 0.0
    outage_over = threading.Event()

    def client() -> None:  # every kind of call, all through the outage
        nonlocal slowest
        calls = [
            ("POST", "/api/predict/work", stack.order(sleep=0)[1], {}),
            ("GET", "/api/predict/work/sink", None, {"_index_": "0", "_length_": "5"}),
            ("GET", "/api/predict/work/sink", None, {"_timeout_": "3s", "requestId": "nope"}),
            ("GET", "/api/predict/work", None, {"_attrs_": "true"}),
        ]
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            while not outage_over.is_set():
                for method, path, body, params in calls:
                    started = time.monotonic()
                    answer = http.request(method, path, content=body, params=params)
                    slowest = max(slowest, time.monotonic() - started)
                    answers[answer.status_code] += 1
                time.sleep(0.1)

    stack.redis_server.stop()  # SIGTERM: Redis goes away (its data dir is kept)
    went_away = time.monotonic()
    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    time.sleep(OUTAGE_SECONDS)
    outage_over.set()
    for thread in clients:
        thread.join()
    stack.redis_server.restart()
    away = time.monotonic() - went_away
    print(f"\nRELIABILITY Redis away {away:.1f} s: answers {dict(answers)}, slowest {slowest:.2f} s")
    assert set(answers) == {503}
    assert slowest < HANG_SECONDS
    wait_until(lambda: stack.put("work", sleep=0.1).status_code == 200, 20, "the API accepting again")
    stack.wait_settled(40)
    assert all(w.is_running() for w in workers)
    assert len(stack.runs()[long_one]) == 1
    assert stack.audit() == {200: len(stack.accepted)}
