"""rq workers on a three-primary Redis Cluster: services on different shards served by the same workers.

A worker that serves several services waits with one blocking read per slot (an XREAD may name one slot only);
rq's own bookkeeping runs on our cluster client (`--connection-class queue_service.store.connection.RqRedisCluster`),
so `rq info` lists the workers. While a served service's slot moves between nodes (ASK, then MOVED), workers
and API go on: every accepted request ends in exactly one terminal state (the failure tests' audit).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.crc import key_slot
from rq.command import send_shutdown_command

from queue_service.embedded_redis import free_port
from queue_service.protocol import REQUEST_ID_HEADER
from queue_service.store import connection, keys
from queue_service.store.consumer import WorkerStore
from queue_service.testing import spawn_worker, write_services
from tests.failure.harness import CHAOS, Put, Stack, wait_until
from tests.support.cluster import RedisCluster3

pytestmark = pytest.mark.integration

# The slot ranges `redis-cli --cluster create` gives three primaries.
THIRDS = ((0, 5460), (5461, 10922), (10923, 16383))


def _one_name_per_third(prefix: str) -> tuple[str, ...]:
    """Service names whose slots fall in each third of the slots: one service per shard."""
    names: list[str] = []
    for low, high in THIRDS:
        names.append(next(f"{prefix}{n}" for n in range(1000) if low <= key_slot(f"{{{prefix}{n}}}".encode()) <= high))
    return tuple(names)


SHARDED = _one_name_per_third("svc")
MOVING, STEADY = _one_name_per_third("mv")[:2]
SERVICES = [
    {"name": name, "processor": CHAOS, "metadata": {"rpc": {"max_queue_size": 100_000}}}
    for name in (*SHARDED, MOVING, STEADY)
]
PER_SERVICE = 20
MOVES = 4
PUTTERS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    with RedisCluster3(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def stack(cluster: RedisCluster3, tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path, cluster, write_services(tmp_path / "services.yaml", SERVICES))  # type: ignore[arg-type]
    try:
        yield stack
    finally:
        stack.stop()
        for process in [*stack.apis, *stack.workers]:
            assert "Traceback" not in process.log_text(), process.log_tail()


def _rq_info(url: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "QS_REDIS_URL": url},
    )


def test_workers_serving_services_on_every_shard_process_them_and_rq_info_lists_them(
    cluster: RedisCluster3, stack: Stack
) -> None:
    owners = {name: cluster.owner(cluster.slot_of(name)).port for name in SHARDED}
    assert len(set(owners.values())) == 3, owners  # one service per shard
    stack.start_api()
    # Two workers, each serving every service of the file: their waits span three slots on three nodes.
    workers = stack.start_workers(2)
    wait_until(lambda: all(_live(stack, name) == 2 for name in SHARDED), 30, "both workers live for every service")
    puts: list[Put] = []
    for round_ in range(PER_SERVICE):
        for name in SHARDED:
            puts.append(stack.put(name))
        if round_ % 5 == 4:
            time.sleep(1.5)  # the workers go idle in between: an item put then wakes their per-slot waits
    assert all(put.status_code == 200 for put in puts), [p.answer.text for p in puts if p.status_code != 200]
    for put in puts:
        item = stack.take_result(put.service, put.request_id, timeout=30)
        assert item is not None, f"no result for {put.service} {put.token}"
    stack.wait_settled(60)
    assert stack.audit(list(SHARDED)) == Counter({200: len(puts)})
    # Both workers took part, on every shard's service.
    pids = {run.pid for runs in stack.runs().values() for run in runs}
    assert pids <= {w.pid for w in workers}

    # rq's own registry lists them: through our settings module and cluster client ...
    info = _rq_info(cluster.url, *connection.rq_cli_options(cluster.url))
    assert info.returncode == 0, info.stderr
    assert all(w.name in info.stdout for w in workers) and "2 workers" in info.stdout, info.stdout
    # ... or rq's --url with our cluster client.
    info = _rq_info(cluster.url, "--url", cluster.url, "--connection-class", connection.RQ_CLUSTER_CONNECTION_CLASS)
    assert info.returncode == 0, info.stderr
    assert all(w.name in info.stdout for w in workers), info.stdout
    # Without the cluster client, one line saying what to add (not redis-py's "must specify one of the schemes").
    info = _rq_info(cluster.url, "-c", connection.RQ_SETTINGS)
    assert info.returncode != 0
    assert f"--connection-class {connection.RQ_CLUSTER_CONNECTION_CLASS}" in info.stderr, info.stderr


def _live(stack: Stack, service: str) -> int:
    answer = httpx.get(f"{stack.url}/api/predict/{service}", params={"_attrs_": "true"}, timeout=10)
    return int(answer.json()["workers.live"]) if answer.status_code == 200 else 0


def test_a_served_slot_moving_under_load_loses_nothing_and_runs_nothing_twice(
    cluster: RedisCluster3, stack: Stack
) -> None:
    slot = cluster.slot_of(MOVING)
    assert cluster.owner(slot).port != cluster.owner(cluster.slot_of(STEADY)).port
    stack.start_api()
    stack.start_workers(2, MOVING, STEADY)
    wait_until(lambda: _live(stack, MOVING) == 2, 30, "both workers live")
    stop = threading.Event()
    answers: Counter[str] = Counter()
    wrong: list[str] = []
    lock = threading.Lock()

    def putter(service: str) -> None:
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            while not stop.is_set():
                token, body = stack.order(sleep=0.01)
                try:
                    answer = http.post(f"/api/predict/{service}", content=body)
                except httpx.TransportError as exc:  # the API never drops a connection: a failure, said so
                    with lock:
                        stack.in_doubt.add(token)
                        wrong.append(f"{service}: {exc!r}")
                    continue
                with lock:
                    answers[f"{service} {answer.status_code}"] += 1
                    if answer.status_code == 200:
                        stack.record(Put(service, token, answer))
                    elif answer.status_code == 503:  # a slot in the middle of its move: may or may not be stored
                        stack.in_doubt.add(token)
                    else:
                        wrong.append(f"{answer.status_code} {answer.text[:200]}")
                time.sleep(0.01)

    threads = [threading.Thread(target=putter, args=(MOVING,), daemon=True) for _ in range(PUTTERS)]
    threads.append(threading.Thread(target=putter, args=(STEADY,), daemon=True))
    for thread in threads:
        thread.start()
    moved: list[int] = []
    try:
        for _ in range(MOVES):
            time.sleep(1.0)
            target = cluster.nodes[(cluster.nodes.index(cluster.owner(slot)) + 1) % len(cluster.nodes)]
            moved.append(cluster.move_slot(slot, target))
            assert cluster.owner(slot).port == target.port
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    print(
        f"\nRELIABILITY cluster workers: slot of {MOVING!r} moved {MOVES} times (keys {moved}); answers {dict(answers)}"
    )
    assert not wrong, wrong[:10]
    assert all(moved) and answers[f"{MOVING} 200"] > 0
    stack.wait_settled(120)
    statuses = stack.audit([MOVING, STEADY])
    assert set(statuses) == {200}, statuses
    # Nothing was run twice by a worker that lived (the audit checks it): no lease lapsed during the moves.
    assert all(w.is_running() for w in stack.workers)


def test_up_on_a_cluster_url_runs_the_api_and_the_workers_there(cluster: RedisCluster3, tmp_path: Path) -> None:
    services = [{"name": name, "processor": "workers.examples:Echo"} for name in SHARDED]
    path = write_services(tmp_path / "services.yaml", services)
    port = free_port()
    log_path = tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QS_")}
    argv = [sys.executable, "-m", "queue_service.cli", "up", "--port", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [*argv, "--services", str(path), "--redis-url", cluster.url],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                answer = httpx.get(f"{url}/readyz", timeout=1)
            except httpx.HTTPError:
                return False
            return answer.status_code == 200 and not answer.json()["services_without_workers"]

        wait_until(ready, 60, f"`up` ready with workers for every service; log:\n{log_path.read_text()}")
        with httpx.Client(base_url=url, timeout=30) as http:
            for name in SHARDED:
                put = http.post(f"/api/predict/{name}", content=name.encode())
                assert put.status_code == 200, put.text
                params = {"requestId": put.headers[REQUEST_ID_HEADER], "_raw_": "true", "_timeout_": "20s"}
                result = http.get(f"/api/predict/{name}/sink", params=params)
                assert (result.status_code, result.content) == (200, name.encode()), result.text
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGINT)
        returncode = up.wait(timeout=60)
    log_text = log_path.read_text()
    assert returncode == 0, log_text
    assert "Traceback" not in log_text, log_text


def test_a_worker_refuses_replicated_durability_on_a_cluster_at_start(cluster: RedisCluster3, tmp_path: Path) -> None:
    # WAIT counts the replicas of the connection that wrote; a cluster client would send it to some other
    # node: the setting cannot be kept there, so a worker asked for it stops at once saying so (as the API does).
    services = [{"name": SHARDED[0], "processor": "workers.examples:Echo", "queue": {"durability": "replicated"}}]
    path = write_services(tmp_path / "services.yaml", services)
    worker = spawn_worker(cluster.url, path, [SHARDED[0]], log_dir=tmp_path)
    assert worker.wait(timeout=60) == 78
    assert "not supported on a Redis Cluster" in worker.log_text(), worker.log_tail()


FAILOVER_BOUND_SECONDS = 30
LOAD_AFTER_RECOVERY_SECONDS = 3


def test_a_shard_failing_over_under_load_workers_and_api_go_on_and_nothing_accepted_is_lost(tmp_path: Path) -> None:
    # Three primaries with a replica each; the primary of one served service's slot is SIGKILLed under load.
    services = [
        {"name": name, "processor": CHAOS, "metadata": {"rpc": {"max_queue_size": 100_000}}}
        for name in (MOVING, STEADY)
    ]
    with RedisCluster3(tmp_path / "cluster", replicas=1) as cluster:
        stack = Stack(tmp_path, cluster, write_services(tmp_path / "services.yaml", services))  # type: ignore[arg-type]
        try:
            _fail_over_under_load(cluster, stack)
        finally:
            stack.stop()
        for process in [*stack.apis, *stack.workers]:  # their stops included
            assert "Traceback" not in process.log_text(), process.log_tail()


def _fail_over_under_load(cluster: RedisCluster3, stack: Stack) -> None:
    slot = cluster.slot_of(MOVING)
    stack.start_api()
    workers = stack.start_workers(2, MOVING, STEADY)
    wait_until(lambda: _live(stack, MOVING) == 2, 30, "both workers live")
    stop = threading.Event()
    answers: Counter[str] = Counter()
    accepted_at: list[float] = []
    unavailable: list[float] = []
    wrong: list[str] = []
    lock = threading.Lock()

    def putter(service: str) -> None:
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            while not stop.is_set():
                token, body = stack.order(sleep=0.01)
                try:
                    answer = http.post(f"/api/predict/{service}", content=body)
                except httpx.TransportError as exc:
                    with lock:
                        stack.in_doubt.add(token)
                        wrong.append(f"{service}: {exc!r}")
                    continue
                with lock:
                    answers[f"{service} {answer.status_code}"] += 1
                    if answer.status_code == 200:
                        stack.record(Put(service, token, answer))
                        accepted_at.append(time.monotonic())
                    elif answer.status_code == 503:  # the shard has no primary: may or may not be stored
                        stack.in_doubt.add(token)
                        unavailable.append(time.monotonic())
                    else:
                        wrong.append(f"{answer.status_code} {answer.text[:200]}")
                time.sleep(0.02)

    threads = [threading.Thread(target=putter, args=(name,), daemon=True) for name in (MOVING, MOVING, STEADY)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        old = cluster.kill_owner(slot)
        killed_at = time.monotonic()
        new = cluster.wait_promoted(slot, old, timeout=FAILOVER_BOUND_SECONDS)
        promoted_after = time.monotonic() - killed_at
        deadline = killed_at + FAILOVER_BOUND_SECONDS
        while time.monotonic() < deadline and not [t for t in accepted_at if t > killed_at + promoted_after]:
            time.sleep(0.1)
        time.sleep(LOAD_AFTER_RECOVERY_SECONDS)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    first_after = min((t for t in accepted_at if t > killed_at + promoted_after), default=None)
    last_503 = max(unavailable, default=killed_at)
    print(
        f"\nRELIABILITY cluster shard failover: primary {old.port} of {MOVING!r} killed; replica {new.port} "
        f"promoted after {promoted_after:.1f} s; 503s until {last_503 - killed_at:.1f} s after the kill; "
        f"first put after the promotion {(first_after or killed_at) - killed_at:.1f} s after the kill; "
        f"answers {dict(answers)}; in doubt {len(stack.in_doubt)}"
    )
    assert not wrong, wrong[:10]
    assert first_after is not None, "no put accepted after the failover"
    assert last_503 - killed_at < FAILOVER_BOUND_SECONDS
    assert stack.apis[0].is_running() and all(w.is_running() for w in workers)  # nobody restarted
    stack.wait_settled(120)
    # A take lost with the old primary hands its item out again (at-least-once processing), as with Sentinel.
    stack.excused.update(w.pid for w in workers)
    statuses = stack.audit([MOVING, STEADY])
    assert set(statuses) == {200}, statuses
    # rq's command channel (`rq shutdown`-style commands) reaches both workers after the failover too: the one
    # whose subscription was on the dead node subscribed again where the channel's slot lives now.
    client = connection.worker_client(cluster.url)
    try:
        for worker in workers:
            send_shutdown_command(client, worker.name)
    finally:
        client.close()
    for worker in workers:
        assert worker.wait(timeout=60) == 0, worker.log_tail()


def test_a_wait_over_services_on_every_shard_reads_each_slot_and_wakes_on_any(cluster: RedisCluster3) -> None:
    # One XREAD of streams in several slots is CROSSSLOT on a cluster: the wait reads each slot on its own.
    client = connection.worker_client(cluster.url)
    store = WorkerStore(client, "waiter")
    names = [f"wait-{name}" for name in SHARDED]  # fresh services: nothing in their streams yet
    try:
        started = time.monotonic()
        store.wait_for_new(dict.fromkeys(names, 0), 1.0)  # nothing comes: returns after the second, no error
        assert time.monotonic() - started >= 0.9
        last = names[-1]
        # An automatic id: the cluster client may send the XADD again after a slow answer on a loaded box, and a
        # fixed id would then fail (equal or smaller than the top item) although the first one was added.
        threading.Timer(0.5, lambda: client.xadd(keys.input_queue(last).normal, {"data": "x"})).start()
        started = time.monotonic()
        store.wait_for_new(dict.fromkeys(names, 0), 30.0)
        assert time.monotonic() - started < 20, "the wait did not wake on the put to the last shard's service"
    finally:
        client.close()
