"""Benchmark: puts/s through one API process against two (uvicorn workers on one port), same run, same Redis.

    python -m bench.api_processes [--seconds S] [--connections C]

Starts a redis-server of its own, then for 1 and 2 processes the API under uvicorn (`--workers N`, the
same command line as `queue-service up --api-workers N`), and puts 100-byte items from the lean asyncio
client of bench/load.py over C keep-alive connections for S seconds. Prints puts/s, latency, and the CPU
seconds each part used (API processes, redis-server, this load generator), which shows what limits it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from bench.load import hammer
from queue_service.embedded_redis import RedisServer, free_port
from queue_service.testing import ManagedProcess, wait_answering, write_services

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _machine_busy() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, every process of every user."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / TICKS, sum(fields) / TICKS


def _tree(pid: int) -> list[int]:
    """A process and its descendants (uvicorn's supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _run(redis: RedisServer, services: Path, processes: int, seconds: float, connections: int, log_dir: Path) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "queue_service.api:create_app", "--factory", "--no-access-log"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(processes)]
    env = {"QS_REDIS_URL": redis.url, "QS_SERVICES": str(services)}
    if processes > 1:
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="qs-metrics-")
    api = ManagedProcess(argv, name=f"api-{processes}", env=env, log_dir=log_dir)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_answering(api, f"{url}/healthz")
        asyncio.run(hammer(f"{url}/api/predict/bench", body=b"x" * 100, connections=connections, max_seconds=1))
        api_pids = _tree(api.pid)
        before = {pid: _cpu_seconds(pid) for pid in [*api_pids, redis.pid or 0, os.getpid()]}
        busy_before, _ = _machine_busy()
        result = asyncio.run(
            hammer(f"{url}/api/predict/bench", body=b"x" * 100, connections=connections, max_seconds=seconds)
        )
        used = {pid: _cpu_seconds(pid) - before[pid] for pid in before}
        machine = (_machine_busy()[0] - busy_before) / result.seconds
    finally:
        api.stop()
    latencies = sorted(result.latencies)
    api_cpu = sum(used[pid] for pid in api_pids)
    return (
        f"{processes:>9} {result.per_second:>7.0f} {latencies[len(latencies) // 2] * 1000:>7.2f} "
        f"{latencies[int(len(latencies) * 0.99)] * 1000:>7.2f} {api_cpu / result.seconds:>8.2f} "
        f"{used[redis.pid or 0] / result.seconds:>10.2f} {used[os.getpid()] / result.seconds:>9.2f} "
        f"{machine:>8.2f}   statuses {dict(result.statuses)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="1 then 2 processes, this many times (default 2)")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="qs-bench-api-") as base,
        RedisServer(data_dir=Path(base) / "redis") as redis,
    ):
        services = write_services(
            Path(base) / "services.yaml",
            [{"name": "bench", "processor": "workers.examples:Echo", "metadata": {"rpc": {"max_queue_size": 10**8}}}],
        )
        load = Path("/proc/loadavg").read_text().split()[0]
        print(f"{os.cpu_count()} cores (load average {load} at the start); 100-byte puts over {args.connections} ")
        print(f"keep-alive connections for {args.seconds:g} s")
        print("processes  puts/s  p50 ms  p99 ms  API cpu  redis cpu  load cpu  machine   (cores busy on average;")
        print(
            "                                                               machine: every process, other users' too)"
        )
        for _ in range(args.rounds):
            for processes in (1, 2):
                print(_run(redis, services, processes, args.seconds, args.connections, Path(base) / "logs"))


if __name__ == "__main__":
    main()
