"""The API on a three-primary Redis Cluster: services spread over the shards, and a slot moved under load.

Every key of a service carries its `{service}` hash tag, so each request's script runs in one slot, on one
node; the waiters' XREAD of one service reads one slot too. While a service's slot moves (MIGRATING /
IMPORTING, MIGRATE, SETSLOT NODE), the client follows ASK and then MOVED by itself: no 500, nothing lost.
Workers on a cluster are not here yet (rq's registration spans slots): see docs/scaling.md.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from queue_service.protocol import REQUEST_ID_HEADER
from queue_service.store import connection, keys
from queue_service.testing import ManagedProcess, start_api, write_services
from tests.support.cluster import RedisCluster3
from tests.support.counts import recount

pytestmark = pytest.mark.integration

SPREAD = ("a", "b", "c", "d")
MOVING = "moving"
SERVICES = [{"name": name, "processor": "workers.examples:Echo"} for name in (*SPREAD, MOVING)]
for service in SERVICES:
    service["metadata"] = {"rpc": {"max_queue_size": 100_000}}
MOVES = 4
PUTTERS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    with RedisCluster3(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def api(cluster: RedisCluster3, tmp_path: Path) -> Iterator[str]:
    process: ManagedProcess
    process, url = start_api(cluster.url, write_services(tmp_path / "services.yaml", SERVICES), log_dir=tmp_path)
    try:
        yield url
    finally:
        process.stop()
        assert "Traceback" not in process.log_text(), process.log_tail()


def _items(url: str, service: str) -> list[dict]:
    """Every item of the input queue, read through the API a page (at most 10,000 items) at a time."""
    found: list[dict] = []
    while True:
        start = found[-1]["index"] + 1 if found else 0
        params = {"_index_": str(start), "_length_": "10000"}
        answer = httpx.get(f"{url}/api/predict/{service}", params=params, timeout=30)
        if answer.status_code == 204:
            return found
        assert answer.status_code == 200, answer.text
        found += answer.json()


def test_services_spread_over_the_shards_each_serve_puts_reads_waits_and_metrics(
    cluster: RedisCluster3, api: str
) -> None:
    owners = {name: cluster.owner(cluster.slot_of(name)).port for name in SPREAD}
    assert len(set(owners.values())) >= 2, owners  # the four services live on more than one node

    def wake_later(service: str) -> None:
        time.sleep(0.5)
        httpx.post(f"{api}/api/predict/{service}", content=b"late")

    with httpx.Client(base_url=api, timeout=30) as http:
        for name in owners:
            assert http.post(f"/api/predict/{name}", content=name.encode()).status_code == 200
            assert http.post(f"/api/predict/{name}/sink", content=b"result").status_code == 200
            # A long poll waits on the waiters' XREAD of this service's streams (one slot) and wakes on a put.
            threading.Thread(target=wake_later, args=(name,)).start()
            waited = http.get(f"/api/predict/{name}", params={"_index_": "2", "_timeout_": "10s", "_raw_": "true"})
            assert (waited.status_code, waited.content) == (200, b"late")
            attrs = http.get(f"/api/predict/{name}", params={"_attrs_": "true"}).json()
            assert attrs["stream.length"] == "2", attrs
            assert http.delete(f"/api/predict/{name}", params={"_indexes_": "1"}).status_code == 200
        metrics = http.get("/metrics").text
        assert all(f'queue_service_waiting_items{{service="{name}"}} 1.0' in metrics for name in owners), metrics
        assert http.get("/readyz", params={"scope": "api"}).status_code == 200


def test_a_slot_moving_under_api_load_answers_no_500_and_loses_nothing(cluster: RedisCluster3, api: str) -> None:
    service = MOVING
    accepted: dict[int, str] = {}
    answers: Counter[int] = Counter()
    wrong: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def putter() -> None:
        with httpx.Client(base_url=api, timeout=30) as http:
            while not stop.is_set():
                answer = http.post(f"/api/predict/{service}", content=b"x")
                with lock:
                    answers[answer.status_code] += 1
                    if answer.status_code == 200:
                        accepted[int(answer.text)] = answer.headers[REQUEST_ID_HEADER]
                    elif answer.status_code != 503:
                        wrong.append(f"{answer.status_code} {answer.text[:200]}")

    def reader() -> None:
        with httpx.Client(base_url=api, timeout=30) as http:
            while not stop.is_set():
                for params in ({"_attrs_": "true"}, {"_index_": "1", "_length_": "5"}):
                    answer = http.get(f"/api/predict/{service}", params=params)
                    if answer.status_code not in (200, 204, 503):
                        with lock:
                            wrong.append(f"read {answer.status_code} {answer.text[:200]}")

    threads = [threading.Thread(target=putter, daemon=True) for _ in range(PUTTERS)]
    threads.append(threading.Thread(target=reader, daemon=True))
    for thread in threads:
        thread.start()
    slot = cluster.slot_of(service)
    moved: list[int] = []
    try:
        for _ in range(MOVES):
            time.sleep(0.5)
            target = cluster.nodes[(cluster.nodes.index(cluster.owner(slot)) + 1) % len(cluster.nodes)]
            moved.append(cluster.move_slot(slot, target))
            assert cluster.owner(slot).port == target.port
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    print(f"\nTIMING cluster slot moved {MOVES} times under load (keys per move {moved}): answers {dict(answers)}")
    assert not wrong, wrong[:10]
    assert answers[200] > 0 and all(moved)
    # Nothing lost: every accepted put is in the queue, under its index and request id, and the counters agree.
    stored = {item["index"]: item["tags"]["requestId"] for item in _items(api, service)}
    assert stored == accepted
    client = connection.sync_client(cluster.url, 10)
    try:
        counts = {k.decode(): int(v) for k, v in client.hgetall(keys.counts(service)).items()}
        assert counts.get("waiting", 0) == recount(client, service)["waiting"] == len(accepted)
    finally:
        client.close()
