"""Benchmark: four services on a three-shard Redis Cluster against the same four on one Redis, same run.

    python -m bench.cluster [--seconds S] [--connections C] [--rounds R]

Starts one redis-server and a three-primary cluster (tests/support/cluster.py: the same binary, with
`--cluster-enabled yes`). For each, alternately: one API process and four rq workers (one per service, as
`queue-service up` runs them; on the cluster with `--connection-class ...RqRedisCluster`), then 100-byte puts
spread over the four services from C keep-alive connections for S seconds, while the workers process them.
Prints puts/s (what the API accepted), processed/s (results the workers wrote in the same window), put
latency, and the CPU each part used (API, workers, every redis-server, this load generator, the whole machine),
which says what limits the throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.crc import key_slot

from bench.api_processes import _cpu_seconds, _machine_busy, _tree
from bench.load import LoadResult, hammer
from queue_service.embedded_redis import RedisServer
from queue_service.store import connection, keys
from queue_service.testing import ManagedProcess, start_api, start_worker, stop_all, write_services
from tests.support.cluster import RedisCluster3

# The slot ranges `redis-cli --cluster create` gives three primaries: four services over all three shards.
THIRDS = ((0, 5460), (5461, 10922), (10923, 16383))


def _third(name: str) -> int:
    slot = key_slot(f"{{{name}}}".encode())
    return next(i for i, (low, high) in enumerate(THIRDS) if low <= slot <= high)


def _services() -> list[str]:
    """Four service names: two on the first shard, one on each other."""
    room = [2, 1, 1]
    names: list[str] = []
    for n in itertools.count():
        name = f"bench{n}"
        if room[_third(name)]:
            room[_third(name)] -= 1
            names.append(name)
        if len(names) == 4:
            return names
    raise AssertionError("unreachable")


SERVICES = _services()


def _results(url: str) -> int:
    """Results written so far, all four services (each sink's last index)."""
    client = connection.sync_client(url, 5)
    try:
        return sum(int(client.get(keys.sink_queue(name).seq) or 0) for name in SERVICES)
    finally:
        client.close()


def _flush(url: str) -> None:
    client = connection.sync_client(url, 10)
    try:
        if connection.is_cluster(client):
            client.flushall(target_nodes=client.ALL_NODES)  # type: ignore[attr-defined]
        else:
            client.flushall()
    finally:
        client.close()


async def _puts(api: str, connections: int, seconds: float) -> LoadResult:
    each = max(1, connections // len(SERVICES))
    parts = await asyncio.gather(
        *(
            hammer(f"{api}/api/predict/{name}", body=b"x" * 100, connections=each, max_seconds=seconds)
            for name in SERVICES
        )
    )
    total = LoadResult(seconds=max(p.seconds for p in parts), statuses=Counter())
    for part in parts:
        total.requests += part.requests
        total.statuses.update(part.statuses)
        total.latencies += part.latencies
    return total


def _run(name: str, url: str, redis_pids: Sequence[int], args: Any, base: Path) -> str:
    _flush(url)
    rpc = {"max_queue_size": 10**8}
    queue = {"sink": {"max_length": 10**8, "max_bytes": 10**11}}
    services = write_services(
        base / "services.yaml",
        [{"name": s, "processor": "workers.examples:Echo", "metadata": {"rpc": rpc}, "queue": queue} for s in SERVICES],
    )
    logs = base / "logs"
    api, api_url = start_api(url, services, log_dir=logs)
    workers: list[ManagedProcess] = []
    try:
        workers = [start_worker(url, services, [s], log_dir=logs) for s in SERVICES]
        asyncio.run(_puts(api_url, args.connections, 1.0))  # warm-up: connections, scripts loaded
        time.sleep(1.0)
        pids = {"api": _tree(api.pid), "workers": [w.pid for w in workers], "redis": list(redis_pids)}
        pids["load"] = [os.getpid()]
        before = {pid: _cpu_seconds(pid) for group in pids.values() for pid in group}
        busy_before, _ = _machine_busy()
        results_before, started = _results(url), time.monotonic()
        result = asyncio.run(_puts(api_url, args.connections, args.seconds))
        processed = (_results(url) - results_before) / (time.monotonic() - started)
        used = {group: sum(_cpu_seconds(pid) - before[pid] for pid in members) for group, members in pids.items()}
        machine = (_machine_busy()[0] - busy_before) / result.seconds
    finally:
        stop_all([*workers, api])
    latencies = sorted(result.latencies) or [0.0]
    per = {group: cpu / result.seconds for group, cpu in used.items()}
    # CPU per request (ms): what a request costs each part, whatever share of the cores the run got.
    cost = {group: used[group] * 1000 / max(1, result.requests) for group in ("api", "workers", "redis")}
    return (
        f"{name:<12} {result.per_second:>7.0f} {processed:>11.0f} {latencies[len(latencies) // 2] * 1000:>7.2f} "
        f"{latencies[int(len(latencies) * 0.99)] * 1000:>7.2f} {per['api']:>7.2f} {per['workers']:>11.2f} "
        f"{per['redis']:>9.2f} {per['load']:>8.2f} {machine:>8.2f}   "
        f"{cost['api']:.2f} / {cost['workers']:.2f} / {cost['redis']:.2f}   statuses {dict(result.statuses)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="one Redis then the cluster, this many times")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qs-bench-cluster-") as tmp:
        base = Path(tmp)
        with RedisServer(data_dir=base / "redis") as single, RedisCluster3(base / "cluster") as cluster:
            owners = {s: cluster.owner(cluster.slot_of(s)).port for s in SERVICES}
            load = Path("/proc/loadavg").read_text().split()[0]
            print(f"{os.cpu_count()} cores (load average {load} at the start); services {owners} (service: node)")
            print(f"100-byte puts over {args.connections} keep-alive connections for {args.seconds:g} s, one API")
            print("process, one worker per service (workers.examples:Echo)")
            print(
                "redis        puts/s processed/s  p50 ms  p99 ms API cpu workers cpu redis cpu load cpu  machine"
                "   cpu ms per request: API / workers / redis"
            )
            print("                                                    (cores busy on average; machine: every process)")
            for _ in range(args.rounds):
                print(_run("one", single.url, [single.pid or 0], args, base))
                print(_run("cluster x3", cluster.url, [n.pid or 0 for n in cluster.nodes], args, base))


if __name__ == "__main__":
    main()
