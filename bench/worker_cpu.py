"""A worker's CPU per item, and Redis's, draining a backlog of no-op items: chains on against chains off.

    python -m bench.worker_cpu [--items 10000] [--rounds 3]

Each round puts `--items` items of 100 bytes straight into the input queue (no API), then starts one
`rq worker -w workers.worker.QueueWorker` on them and waits until every result is in the sink, once with
`QS_WORKER_PREFETCH=true` (the default: no-op items run in chains, one round trip per chain) and once with
`false` (one round trip per item, the finish taking the next item), alternated on the same redis-server.
Prints, per side, the medians over the rounds of the worker process's CPU µs per item (utime + stime from
/proc, from its first take to its last result), Redis's CPU µs per item (INFO) and items/s, and on / off.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import redis

from bench import redis_cost
from bench.api_processes import _cpu_seconds
from queue_service.embedded_redis import RedisServer
from queue_service.store import keys, scripts
from queue_service.testing import spawn_worker, stop_all, wait_listening, write_services

SERVICE = "drain"
BIG = 10**8
PUT_BATCH = 500


def _fill(client: redis.Redis, store: scripts.Scripts, items: int) -> None:
    queue = keys.input_queue(SERVICE)
    now_ms = int(time.time() * 1000)
    calls = [
        scripts.put(queue, data=b"x" * 100, tags={}, request_id=str(uuid.uuid4()), now_ms=now_ms, max_items=BIG)
        for _ in range(items)
    ]
    for start in range(0, items, PUT_BATCH):
        store.run_many(calls[start : start + PUT_BATCH], client)


def drain(server: RedisServer, services_file: Path, log_dir: Path, items: int, prefetch: str) -> dict[str, float]:
    """One worker drains `items` items put beforehand: its CPU and Redis's per item, and items/s."""
    client = redis.Redis.from_url(server.url)
    _fill(client, scripts.Scripts(client), items)
    results = keys.sink_queue(SERVICE).ids
    before = client.hlen(results)
    worker = spawn_worker(server.url, services_file, [SERVICE], env={"QS_WORKER_PREFETCH": prefetch}, log_dir=log_dir)
    try:
        wait_listening(worker, server.url)
        cpu, redis_cpu, started = _cpu_seconds(worker.pid), redis_cost.snapshot(client).cpu, time.perf_counter()
        deadline = time.monotonic() + 300
        while client.hlen(results) - before < items:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{items} results not in after 300 s; worker log:\n{worker.log_tail()}")
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        return {
            "worker_us": (_cpu_seconds(worker.pid) - cpu) / items * 1e6,
            "redis_us": (redis_cost.snapshot(client).cpu - redis_cpu) / items * 1e6,
            "items_s": items / seconds,
        }
    finally:
        stop_all([worker])
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-worker-cpu-"))
    services_file = write_services(
        log_dir / "services.yaml",
        [
            {
                "name": SERVICE,
                "processor": "workers.examples:Echo",
                "metadata": {"rpc": {"max_queue_size": BIG}},
                "queue": {"sink": {"max_length": BIG}},
            }
        ],
    )
    sides: dict[str, list[dict[str, float]]] = {"true": [], "false": []}
    with RedisServer() as server:
        for round_no in range(args.rounds):
            for prefetch in ("true", "false") if round_no % 2 == 0 else ("false", "true"):
                measured = drain(server, services_file, log_dir, args.items, prefetch)
                sides[prefetch].append(measured)
                print(
                    f"round {round_no + 1} QS_WORKER_PREFETCH={prefetch:<5}"
                    f"  worker {measured['worker_us']:6.1f} µs/item  redis {measured['redis_us']:5.1f} µs/item"
                    f"  {measured['items_s']:7.0f} items/s",
                    flush=True,
                )
    print(f"\nmedians over {args.rounds} rounds, {args.items} no-op items each, one worker:")
    print("measure               chains on  chains off   on / off")
    for name, label in (("worker_us", "worker CPU µs/item"), ("redis_us", "Redis CPU µs/item"), ("items_s", "items/s")):
        on = statistics.median(m[name] for m in sides["true"])
        off = statistics.median(m[name] for m in sides["false"])
        print(f"{label:<20} {on:10.1f} {off:11.1f} {on / off:10.2f}")


if __name__ == "__main__":
    main()
