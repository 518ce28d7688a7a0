"""Before/after for a worker change: two worker classes, alternated in one run on the same Redis and API.

    python -m bench.ab [--a bench.variants.EveryWriteWorker] [--b workers.worker.QueueWorker] [--rounds 3]

Each round runs one worker of class A, then one of class B (one at a time, service `echo`), and
measures: results/s end to end (put N, watch the sink; no-op items, then items of 10 ms), sync latency
with one client, and Redis commands / round trips / CPU per request for both. Prints the medians over
the rounds and B / A.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import redis_cost
from bench.load import Http
from bench.run import PAYLOAD, PLANS, SLEEP_PAYLOAD, Bench, fmt, pct
from queue_service.testing import stop_all, wait_listening


def measure(bench: Bench, results: int, sync: int, short: int) -> dict[str, float]:
    bench._ours_results(100)  # warm up
    before = redis_cost.snapshot(bench.redis)
    rate = bench._ours_results(results)
    batch = redis_cost.delta(before, redis_cost.snapshot(bench.redis), bench.idle).per(results)
    short_rate = bench._ours_results(short, payload=SLEEP_PAYLOAD)
    http = Http(bench.api_url)
    latencies = []
    try:
        before = redis_cost.snapshot(bench.redis)
        for _ in range(sync):
            started = time.perf_counter()
            assert http.request("POST", "/api/predict/echo/sync", PAYLOAD)[0] == 200
            latencies.append(time.perf_counter() - started)
        single = redis_cost.delta(before, redis_cost.snapshot(bench.redis), bench.idle).per(sync)
    finally:
        http.close()
    return {
        "results/s, 1 worker": rate,
        "results/s, 1 worker, 10 ms items (ceiling 100)": short_rate,
        "async batch: round trips/request": batch["round_trips"],
        "async batch: commands/request": batch["commands"],
        "async batch: Redis CPU µs/request": batch["redis_cpu_us"],
        "sync 1 client: p50 ms": pct(latencies, 0.5) * 1000,
        "sync 1 client: p99 ms": pct(latencies, 0.99) * 1000,
        "sync 1 client: round trips/request": single["round_trips"],
        "sync 1 client: commands/request": single["commands"],
        "sync 1 client: Redis CPU µs/request": single["redis_cpu_us"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", default="bench.variants.EveryWriteWorker", help="worker class A (before)")
    parser.add_argument("--b", default="workers.worker.QueueWorker", help="worker class B (after)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", type=int, default=2000, help="items per results/s measurement")
    parser.add_argument("--sync", type=int, default=500, help="sync requests per latency measurement")
    parser.add_argument("--short", type=int, default=300, help="10 ms items per results/s measurement")
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-ab-"))
    bench = Bench(dataclasses.replace(PLANS["quick"], result_workers=(1,)), log_dir)
    found: dict[str, list[dict[str, float]]] = {args.a: [], args.b: []}
    try:
        bench.start()
        stop_all(bench.ours)
        bench.ours = []
        bench.idle = redis_cost.background(bench.redis, 3.0)
        for round_ in range(args.rounds):
            for worker_class in (args.a, args.b):
                name = f"ab-{round_}-{worker_class.rsplit('.', 1)[-1]}"
                worker = bench.spawn_ours(name, "echo", worker_class)
                try:
                    wait_listening(worker, bench.url, live_in=["echo"])
                    found[worker_class].append(measure(bench, args.results, args.sync, args.short))
                finally:
                    stop_all([worker])
                print(f"round {round_ + 1}: {worker_class} done", flush=True)
    finally:
        bench.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    print()
    print(f"| median of {args.rounds} rounds | A: {args.a} | B: {args.b} | B / A |")
    print("|---|---:|---:|---:|")
    for metric in found[args.a][0]:
        a = statistics.median(m[metric] for m in found[args.a])
        b = statistics.median(m[metric] for m in found[args.b])
        print(f"| {metric} | {fmt(a)} | {fmt(b)} | {fmt(b / a if a else float('nan'))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
