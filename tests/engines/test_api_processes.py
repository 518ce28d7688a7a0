"""Several API processes on one Redis: replicas behind a load balancer, and `up --api-workers N` on one port.

Whatever process a request reaches, the service behaves as one: one queue bound, one rate limit, one set of
watch groups, each sync request answered through its own process's reply channel, and /metrics counting
every process's requests in every scrape.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from websockets.sync.client import connect

from queue_service.embedded_redis import RedisServer, free_port
from queue_service.testing import ManagedProcess, start_api, start_worker, stop_all, wait_answering, write_services
from queue_service.wire import decode_frame
from tests.hostile.watching import GID_HEADER, observe_watch, ws_url
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

QUEUE_SERVICE = str(Path(sys.executable).parent / "queue-service")
BOUND = 10
RATE = 10.0
SERVICES = [
    {"name": "bounded", "processor": "workers.examples:Echo", "metadata": {"rpc": {"max_queue_size": BOUND}}},
    {"name": "limited", "processor": "workers.examples:Echo", "metadata": {"rpc": {"rate_limit": RATE}}},
    {"name": "echo", "processor": "workers.examples:Echo"},
    {"name": "watched", "processor": "workers.examples:Echo", "queue": {"max_groups": 1}},
]


@dataclass
class Replicas:
    redis: redis.Redis
    urls: list[str]

    def url(self, number: int) -> str:
        """Round robin, as a load balancer would."""
        return self.urls[number % len(self.urls)]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    base = tmp_path_factory.mktemp("replicas")
    services = write_services(base / "services.yaml", SERVICES)
    with RedisServer(data_dir=base / "redis") as server:
        processes: list[ManagedProcess] = []
        try:
            for _ in range(2):
                api, _ = start_api(server.url, services, log_dir=base / "logs")
                processes.append(api)
            processes.append(start_worker(server.url, services, ["echo"], log_dir=base / "logs"))
            client = redis.Redis.from_url(server.url)
            yield Replicas(client, [f"http://127.0.0.1:{p.name.split('-')[1]}" for p in processes[:2]])
            client.close()
        finally:
            stop_all(processes)


def test_the_queue_bound_holds_across_api_replicas(replicas: Replicas) -> None:
    answers = [httpx.post(f"{replicas.url(n)}/api/predict/bounded", content=b"x").status_code for n in range(BOUND + 6)]
    assert answers == [200] * BOUND + [450] * 6


def test_the_rate_limit_is_one_limit_across_api_replicas(replicas: Replicas) -> None:
    started = time.monotonic()
    by_replica: dict[int, Counter[int]] = {0: Counter(), 1: Counter()}
    with httpx.Client(timeout=10) as http:
        for number in range(80):
            answer = http.post(f"{replicas.url(number)}/api/predict/limited", content=b"x")
            by_replica[number % 2][answer.status_code] += 1
    elapsed = time.monotonic() - started
    admitted = by_replica[0][200] + by_replica[1][200]
    # One second's burst plus the rate for the time taken; two per-process limits would admit twice that.
    assert admitted <= RATE + RATE * elapsed + 2, (admitted, elapsed, by_replica)
    assert by_replica[0][429] and by_replica[1][429], by_replica


def test_sync_requests_through_either_replica_each_get_their_own_answer(replicas: Replicas) -> None:
    def call(number: int) -> tuple[int, bytes]:
        answer = httpx.post(f"{replicas.url(number)}/api/predict/echo/sync", content=f"n{number}".encode(), timeout=30)
        return answer.status_code, answer.content

    wait_until(lambda: call(0)[0] == 200, 30, "the worker counted live")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(40)))
    assert answers == [(200, f"n{n}".encode()) for n in range(40)]
    # Each replica waited on its own reply channel: two reply streams, one per process.
    assert len(list(replicas.redis.scan_iter(match="qs:{echo}:replies:*"))) == 2


def test_watch_groups_are_shared_by_api_replicas(replicas: Replicas) -> None:
    first, second = replicas.urls
    path = "/api/predict/watched"
    with connect(ws_url(first, path, _watch_="true"), additional_headers={GID_HEADER: "g1"}, open_timeout=20) as ws:
        time.sleep(0.5)  # the watch has joined its group
        # A put through the other replica wakes the watch of this one (through Redis, not in process).
        assert httpx.post(f"{second}{path}", content=b"hello").status_code == 200
        frame = decode_frame(ws.recv(timeout=10))
        assert frame.data == b"hello"
        # The queue's one group is in use (max_groups: 1), whichever replica the next watch reaches.
        refused = observe_watch(ws_url(second, path, _watch_="true"), {GID_HEADER: "g2"}, seconds=5)
        assert refused.close_code == 1013 and "max_groups" in refused.close_reason, refused


def _requests_total(text: str, service: str, operation: str, status: str) -> float:
    pattern = (
        r"^queue_service_requests_total\{"
        + rf'(?=[^}}]*service="{service}")(?=[^}}]*operation="{operation}")(?=[^}}]*status="{status}")[^}}]*\}} (\S+)$'
    )
    return sum(float(value) for value in re.findall(pattern, text, flags=re.MULTILINE))


def test_up_with_two_api_workers_counts_every_process_in_every_scrape(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    services = write_services(tmp_path / "services.yaml", SERVICES)
    port = free_port()
    up = ManagedProcess(
        [
            *(QUEUE_SERVICE, "up", "--services", str(services), "--redis-url", redis_server.url),
            *("--workers", "0", "--port", str(port), "--api-workers", "2"),
        ],
        name="up",
        log_dir=tmp_path / "logs",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_answering(up, f"{base}/healthz")
        puts = 60
        # A new connection per request, so the kernel spreads them over both processes.
        with httpx.Client(base_url=base, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            for _ in range(puts):
                assert http.post("/api/predict/echo", content=b"x").status_code == 200
            seen = [_requests_total(http.get("/metrics").text, "echo", "put", "200") for _ in range(8)]
        assert seen == [puts] * 8, seen
        assert "API on" in up.log_text() and "(2 processes)" in up.log_text()
    finally:
        up.stop(grace=15)
