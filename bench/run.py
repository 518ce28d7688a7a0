"""Benchmark: our overhead against its baselines, measured in one run on this machine.

    python -m bench.run [--smoke | --quick] [--json FILE]

Starts a real redis-server (its own, on a free port of 127.0.0.1), the API under uvicorn (one process),
a FastAPI hello-world under uvicorn the same way, our `rq worker -w workers.worker.QueueWorker` workers
and plain `rq worker -w rq.worker.SimpleWorker` workers, then measures:

1. sync-path latency (Echo processor), 1 and 20 concurrent clients, against a direct call of the
   processor and plain RQ (`enqueue` + `job.latest_result(timeout)`) with the same number of workers;
2. result delivery: from the processor returning to a watching (WebSocket) and a long-polling client;
3. async throughput: puts/s through one API process; results/s end to end with 1, 2, 4 workers
   (put N, watch the sink until all N arrive) against plain RQ SimpleWorkers draining the same N;
4. rejection cost: 450 answers/s from one API process against a hello-world route;
5. Redis commands, round trips and Redis CPU per request, against plain RQ.

Prints one table: absolute numbers and ratios (ours / baseline). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml
from rq import Queue
from rq.registry import FinishedJobRegistry
from websockets.asyncio.client import connect as ws_connect
from websockets.sync.client import connect as ws_connect_sync

from bench import jobs, redis_cost
from bench.load import Http, hammer
from queue_service.embedded_redis import RedisServer
from queue_service.store import keys
from queue_service.testing import ManagedProcess, spawn_api, spawn_worker, stop_all, wait_answering, wait_listening
from queue_service.wire import decode_frame
from workers.examples import Echo

PAYLOAD = b"x" * 16
SLEEP_PAYLOAD = b"s" * 16  # bench.jobs:EchoOrSleep: 10 ms of blocking work, then the echo
RQ_QUEUE = "bench"
RQ_IDLE_QUEUE = "bench-idle"  # enqueue rate, with no worker draining it
GID_HEADER = "X-EAS-QueueService-Redis-Gid"
WATCH_WINDOW = 1000
BIG = 1_000_000

SERVICES = [
    {
        "name": "echo",
        "processor": "bench.jobs:EchoOrSleep",  # echoes (PAYLOAD); SLEEP_PAYLOAD sleeps 10 ms first
        "metadata": {"rpc": {"keepalive": 30_000, "max_queue_size": BIG}},
        "queue": {"sink": {"max_length": BIG}},
    },
    {"name": "stamp", "processor": "bench.jobs:Stamp", "metadata": {"rpc": {"keepalive": 30_000}}},
    {"name": "puts", "processor": "workers.examples:Echo", "metadata": {"rpc": {"max_queue_size": BIG}}},
    {"name": "full", "processor": "workers.examples:Echo", "metadata": {"rpc": {"max_queue_size": 1}}},
]


@dataclass(frozen=True)
class Plan:
    name: str
    sync_requests: dict[int, int]  # concurrent clients -> requests
    sync_workers: int
    delivery_items: int
    puts: int
    results: int
    result_workers: tuple[int, ...]
    load_connections: int
    rate_seconds: float
    cost_requests: int
    idle_seconds: float
    phase_seconds: float  # bound of any one measured loop


PLANS = {
    "smoke": Plan("smoke", {1: 20, 20: 40}, 1, 5, 200, 100, (1,), 8, 0.5, 20, 0.5, 15),
    "quick": Plan("quick", {1: 300, 20: 600}, 2, 60, 2000, 1000, (1, 2, 4), 16, 3.0, 200, 2.0, 60),
    "full": Plan("full", {1: 2000, 20: 4000}, 2, 300, 10_000, 5000, (1, 2, 4), 16, 10.0, 1000, 5.0, 180),
}


@dataclass
class Row:
    section: str
    what: str
    unit: str
    ours: float
    baseline: str
    base: float
    better: str  # "lower" or "higher"

    @property
    def ratio(self) -> float:
        return self.ours / self.base if self.base else float("nan")


@dataclass
class Report:
    plan: str
    machine: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    breakdown: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, *args: Any) -> None:
        self.rows.append(Row(*args))
        row = self.rows[-1]
        print(
            f"  {row.section} {row.what}: ours {fmt(row.ours)} {row.unit}, {row.baseline} {fmt(row.base)} "
            f"(x{fmt(row.ratio)})",
            flush=True,
        )


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.2g}" if abs(value) < 1e-4 else f"{value:.4f}"


def table(report: Report) -> str:
    lines = [
        "| # | measurement | unit | ours | baseline | baseline value | ours / baseline | better |",
        "|---|---|---|---:|---|---:|---:|---|",
    ]
    for row in sorted(report.rows, key=lambda r: r.section):  # stable: the run's order within a section
        lines.append(
            f"| {row.section} | {row.what} | {row.unit} | {fmt(row.ours)} | {row.baseline} | {fmt(row.base)} "
            f"| {fmt(row.ratio)} | {row.better} |"
        )
    return "\n".join(lines)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def machine_info(redis_version: str) -> dict[str, str]:
    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "redis": redis_version,
        "os": platform.platform(),
    }


class Bench:
    def __init__(self, plan: Plan, log_dir: Path) -> None:
        self.plan = plan
        self.log_dir = log_dir
        self.server = RedisServer(data_dir=log_dir / "redis")
        self.ours: list[ManagedProcess] = []
        self.plain: list[ManagedProcess] = []
        self.others: list[ManagedProcess] = []
        self.report: Report | None = None
        self.idle: redis_cost.Cost | None = None  # Redis's background work per second, once measured

    # --- processes ------------------------------------------------------------------------

    def start(self) -> None:
        self.server.start()
        self.url = self.server.url
        self.redis = redis.Redis.from_url(self.url)
        self.services_file = self.log_dir / "services.yaml"
        self.services_file.write_text(yaml.safe_dump({"services": SERVICES}, sort_keys=False))
        api, self.api_url = spawn_api(self.url, self.services_file, log_dir=self.log_dir)
        hello, self.hello_url = spawn_api(self.url, None, app="bench.hello:create_app", log_dir=self.log_dir)
        self.others += [api, hello]
        most = max(self.plan.result_workers)
        self.ours = [self.spawn_ours(f"qs-bench-{i}", "echo") for i in range(most)]
        self.plain = [self._spawn_plain(f"rq-bench-{i}") for i in range(most)]
        wait_answering(api, f"{self.api_url}/healthz")
        wait_answering(hello, f"{self.hello_url}/hello", "POST")
        for worker in self.ours:
            wait_listening(worker, self.url, live_in=["echo"])
        for worker in self.plain:
            wait_listening(worker, self.url)
        self.report = Report(self.plan.name, machine_info(self.redis.info("server")["redis_version"]))

    def spawn_ours(self, name: str, service: str, worker_class: str = "workers.worker.QueueWorker") -> ManagedProcess:
        return spawn_worker(
            self.url, self.services_file, [service], name=name, worker_class=worker_class, log_dir=self.log_dir
        )

    def _spawn_plain(self, name: str) -> ManagedProcess:
        return self.spawn_ours(name, RQ_QUEUE, "rq.worker.SimpleWorker")

    def keep_workers(self, count: int) -> None:
        stop_all(self.ours[count:] + self.plain[count:])
        self.ours, self.plain = self.ours[:count], self.plain[:count]
        deadline = time.monotonic() + 10
        while self.redis.zcount(keys.live_workers("echo"), time.time(), "+inf") > count:
            if time.monotonic() > deadline:
                raise RuntimeError("stopped workers are still counted live")
            time.sleep(0.05)

    def stop(self) -> None:
        stop_all(self.ours + self.plain + self.others)
        self.server.stop()

    # --- the run --------------------------------------------------------------------------

    def run(self) -> Report:
        assert self.report is not None
        print(f"bench ({self.plan.name}): redis {self.url}, API {self.api_url}, logs in {self.log_dir}", flush=True)
        self.rejection()
        self.put_rate()
        for count in sorted(self.plan.result_workers, reverse=True):
            self.keep_workers(count)
            if count == 1:
                self.cost()
            else:
                self.results(count)
            if count == self.plan.sync_workers:
                for clients in sorted(self.plan.sync_requests):
                    self.sync_latency(clients, self.plan.sync_requests[clients], count)
        self.delivery()
        return self.report

    # 4. rejection cost --------------------------------------------------------------------

    def rejection(self) -> None:
        print("4. rejection cost", flush=True)
        client = Http(self.api_url)
        try:
            statuses = [client.request("POST", "/api/predict/full", PAYLOAD)[0] for _ in range(2)]
        finally:
            client.close()
        assert statuses == [200, 450], f"the full queue answered {statuses}"
        seconds, conns = self.plan.rate_seconds, self.plan.load_connections

        def rate(url: str, method: str = "POST", expect: int = 200) -> float:
            asyncio.run(hammer(url, method=method, body=PAYLOAD, connections=conns, max_seconds=0.3))  # warm up
            result = asyncio.run(hammer(url, method=method, body=PAYLOAD, connections=conns, max_seconds=seconds))
            assert set(result.statuses) == {expect}, f"{url}: {dict(result.statuses)}"
            return result.per_second

        hello = rate(f"{self.hello_url}/hello")
        full = rate(f"{self.api_url}/api/predict/full", expect=450)
        health = rate(f"{self.api_url}/healthz", "GET")
        self.hello_rate = hello
        self.report.add("4", "450 answers, queue full", "answers/s", full, "hello-world route", hello, "higher")
        self.report.add("4", "GET /healthz (no Redis)", "answers/s", health, "hello-world route", hello, "higher")

    # 3a. puts/s ---------------------------------------------------------------------------

    def put_rate(self) -> None:
        print("3. async throughput: puts/s", flush=True)
        n, conns = self.plan.puts, self.plan.load_connections
        url = f"{self.api_url}/api/predict/puts"
        asyncio.run(hammer(url, body=PAYLOAD, connections=conns, max_requests=100))  # warm up
        result = asyncio.run(hammer(url, body=PAYLOAD, connections=conns, max_requests=n, max_seconds=60))
        assert set(result.statuses) == {200}, dict(result.statuses)
        self.redis.delete(*keys.service_keys("puts"))

        queue = Queue(RQ_IDLE_QUEUE, connection=self.redis)
        enqueued = run_threads(conns, n, lambda: queue.enqueue(jobs.noop), self.plan.phase_seconds)
        queue.delete(delete_jobs=True)
        self.report.add(
            "3", "puts (one API process)", "puts/s", result.per_second, "hello-world route", self.hello_rate, "higher"
        )
        self.report.add(
            "3",
            "puts (one API process)",
            "puts/s",
            result.per_second,
            "RQ enqueue (client threads)",
            enqueued.per_second,
            "higher",
        )

    # 3b. results/s end to end --------------------------------------------------------------

    def results(self, workers: int, cost: bool = False) -> tuple[redis_cost.Cost, redis_cost.Cost] | None:
        print(f"3. async throughput: results/s, {workers} worker(s)", flush=True)
        n = self.plan.results
        self._ours_results(20, "warm up")
        before = redis_cost.snapshot(self.redis)
        ours = self._ours_results(n)
        ours_cost = redis_cost.delta(before, redis_cost.snapshot(self.redis), self.idle)
        self._plain_results(20)
        before = redis_cost.snapshot(self.redis)
        plain = self._plain_results(n)
        plain_cost = redis_cost.delta(before, redis_cost.snapshot(self.redis), self.idle)
        self.report.add(
            "3",
            f"results end to end, {workers} worker(s)",
            "results/s",
            ours,
            f"RQ SimpleWorker x{workers}",
            plain,
            "higher",
        )
        return (ours_cost, plain_cost) if cost else None

    def _ours_results(self, n: int, note: str = "", payload: bytes = PAYLOAD) -> float:
        put_url = f"{self.api_url}/api/predict/echo"
        watch_url = (
            self.api_url.replace("http://", "ws://")
            + f"/api/predict/echo/sink?_watch_=true&_auto_commit_=true&_window_={WATCH_WINDOW}"
        )
        bound = self.plan.phase_seconds

        async def run() -> float:
            async with ws_connect(watch_url, additional_headers={GID_HEADER: "bench"}, max_size=None) as ws:
                started = time.perf_counter()
                puts = asyncio.create_task(
                    hammer(
                        put_url, body=payload, connections=self.plan.load_connections, max_requests=n, max_seconds=bound
                    )
                )
                for _ in range(n):
                    await asyncio.wait_for(ws.recv(), timeout=bound)
                elapsed = time.perf_counter() - started
                put = await puts
                assert put.statuses == {200: n}, dict(put.statuses)
                return n / elapsed

        return asyncio.run(run())

    def _plain_results(self, n: int) -> float:
        queue = Queue(RQ_QUEUE, connection=self.redis)
        registry = FinishedJobRegistry(queue=queue)
        first = self.redis.zcard(registry.key)
        started = time.perf_counter()
        deadline = time.monotonic() + self.plan.phase_seconds
        done = threading.Event()
        enqueuer = threading.Thread(
            target=lambda: (
                run_threads(self.plan.load_connections, n, lambda: queue.enqueue(jobs.noop), self.plan.phase_seconds),
                done.set(),
            )
        )
        enqueuer.start()
        while self.redis.zcard(registry.key) - first < n:
            if time.monotonic() > deadline:
                raise RuntimeError("plain RQ did not finish its jobs in time")
            time.sleep(0.002)
        elapsed = time.perf_counter() - started
        enqueuer.join()
        return n / elapsed

    # 1. sync latency ------------------------------------------------------------------------

    def sync_latency(self, clients: int, n: int, workers: int, quiet: bool = False) -> tuple[list, list]:
        if not quiet:
            print(f"1. sync latency, {clients} client(s), {workers} worker(s)", flush=True)
        bound = self.plan.phase_seconds
        local = threading.local()

        def ours_call() -> float:
            if not hasattr(local, "http"):
                local.http = Http(self.api_url)
            started = time.perf_counter()
            status, _, body = local.http.request("POST", "/api/predict/echo/sync", PAYLOAD)
            elapsed = time.perf_counter() - started
            assert status == 200 and body == PAYLOAD, (status, body[:200])
            return elapsed

        queue = Queue(RQ_QUEUE, connection=self.redis)

        def plain_call() -> float:
            started = time.perf_counter()
            job = queue.enqueue(jobs.noop)
            result = job.latest_result(timeout=30)
            elapsed = time.perf_counter() - started
            assert result is not None and result.type == result.Type.SUCCESSFUL, result
            return elapsed

        run_threads(clients, min(n, 4 * clients), ours_call, bound)  # warm up
        ours = run_threads(clients, n, ours_call, bound).latencies
        run_threads(clients, min(n, 4 * clients), plain_call, bound)
        plain = run_threads(clients, n, plain_call, bound).latencies
        if quiet:
            return ours, plain
        echo = Echo()
        direct = []
        for _ in range(max(n, 1000)):
            started = time.perf_counter()
            echo.process(PAYLOAD)
            direct.append(time.perf_counter() - started)
        label = f"sync, {clients} client(s), {workers} worker(s)"
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            ms = pct(ours, q) * 1000
            self.report.add(
                "1", f"{label} {name}", "ms", ms, f"RQ SimpleWorker x{workers}", pct(plain, q) * 1000, "lower"
            )
            self.report.add("1", f"{label} {name}", "ms", ms, "direct call", pct(direct, q) * 1000, "lower")
        return ours, plain

    # 5. Redis cost --------------------------------------------------------------------------

    def cost(self) -> None:
        print("5. Redis cost per request (1 worker each); idle background first", flush=True)
        self.idle = redis_cost.background(self.redis, self.plan.idle_seconds)
        costs = self.results(1, cost=True)
        assert costs is not None
        self._cost_rows("async: put + watch (batch)", *costs, self.plan.results)
        # The floors: the same requests in raw stream commands, no Lua, on this machine (redis_cost.*_floor).
        self.report.add(
            "5",
            "async: put + watch (batch): Redis CPU",
            "µs/request",
            costs[0].per(self.plan.results)["redis_cpu_us"],
            "raw streams, no Lua (the floor)",
            redis_cost.async_floor(self.url, self.plan.results, self.plan.load_connections),
            "lower",
        )
        n = self.plan.cost_requests
        self.sync_latency(1, 20, 1, quiet=True)  # warm up

        def measured(call: Callable[[], Any]) -> redis_cost.Cost:
            before = redis_cost.snapshot(self.redis)
            call()
            return redis_cost.delta(before, redis_cost.snapshot(self.redis), self.idle)

        def ours() -> None:
            client = Http(self.api_url)
            try:
                for _ in range(n):
                    assert client.request("POST", "/api/predict/echo/sync", PAYLOAD)[0] == 200
            finally:
                client.close()

        def plain() -> None:
            queue = Queue(RQ_QUEUE, connection=self.redis)
            for _ in range(n):
                assert queue.enqueue(jobs.noop).latest_result(timeout=30) is not None

        sync_cost = measured(ours)
        self._cost_rows("sync, 1 client", sync_cost, measured(plain), n)
        # The floor under the sync row: what a round trip costs Redis on this machine before any work.
        sync = sync_cost.per(n)
        self.report.add(
            "5",
            "sync, 1 client: Redis CPU per round trip",
            "µs",
            sync["redis_cpu_us"] / max(sync["round_trips"], 1e-9),
            "a bare PING round trip",
            redis_cost.round_trip(self.redis),
            "lower",
        )
        for baseline, publish in (("raw streams, no Lua (the floor)", False), ("raw, answer by PUBLISH", True)):
            self.report.add(
                "5",
                "sync, 1 client: Redis CPU",
                "µs/request",
                sync["redis_cpu_us"],
                baseline,
                redis_cost.sync_floor(self.url, n, publish=publish),
                "lower",
            )

    def _cost_rows(self, label: str, ours: redis_cost.Cost, plain: redis_cost.Cost, n: int) -> None:
        o, p = ours.per(n), plain.per(n)
        self.report.add(
            "5", f"{label}: commands (incl. inside Lua)", "/request", o["commands"], "plain RQ", p["commands"], "lower"
        )
        self.report.add(
            "5", f"{label}: round trips", "/request", o["round_trips"], "plain RQ", p["round_trips"], "lower"
        )
        self.report.add(
            "5", f"{label}: Redis CPU", "µs/request", o["redis_cpu_us"], "plain RQ", p["redis_cpu_us"], "lower"
        )
        self.report.breakdown[f"{label} (ours)"] = ours.top(n)
        self.report.breakdown[f"{label} (plain RQ)"] = plain.top(n)

    # 2. result delivery ---------------------------------------------------------------------

    def delivery(self) -> None:
        print("2. result delivery (1 worker each)", flush=True)
        stop_all(self.ours)
        self.ours = [self.spawn_ours("qs-bench-stamp", "stamp")]
        wait_listening(self.ours[0], self.url, live_in=["stamp"])
        n = self.plan.delivery_items
        bound = time.monotonic() + self.plan.phase_seconds * 3
        http = Http(self.api_url)
        watch_url = (
            self.api_url.replace("http://", "ws://")
            + "/api/predict/stamp/sink?_watch_=true&_auto_commit_=true&_window_=1"
        )
        watched, polled, plain = [], [], []
        try:
            with ws_connect_sync(watch_url, additional_headers={GID_HEADER: "bench"}) as ws:
                for i in range(n + 3):
                    assert http.request("POST", "/api/predict/stamp", PAYLOAD)[0] == 200
                    frame = decode_frame(ws.recv(timeout=30))
                    if i >= 3:  # warm-up items first
                        watched.append(time.time() - float(frame.data))
                    if time.monotonic() > bound:
                        break
            for i in range(n + 3):
                status, headers, _ = http.request("POST", "/api/predict/stamp", PAYLOAD)
                assert status == 200
                rid = headers["x-eas-queueservice-request-id"]
                status, _, body = http.request(
                    "GET", f"/api/predict/stamp/sink?requestId={rid}&_timeout_=30s&_raw_=true"
                )
                received = time.time()
                assert status == 200, status
                if i >= 3:
                    polled.append(received - float(body))
                if time.monotonic() > bound:
                    break
        finally:
            http.close()
        queue = Queue(RQ_QUEUE, connection=self.redis)
        for i in range(n + 3):
            result = queue.enqueue(jobs.stamp).latest_result(timeout=30)
            received = time.time()
            assert result is not None and result.return_value is not None, result
            if i >= 3:
                plain.append(received - float(result.return_value))
            if time.monotonic() > bound:
                break
        for values, label in ((watched, "watch (WebSocket)"), (polled, "long poll (GET _timeout_)")):
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                self.report.add(
                    "2",
                    f"delivery to {label} {name}",
                    "ms",
                    pct(values, q) * 1000,
                    "RQ latest_result(timeout)",
                    pct(plain, q) * 1000,
                    "lower",
                )


def run_threads(threads: int, n: int, call: Callable[[], Any], max_seconds: float) -> Any:
    """`call()` n times over `threads` threads (bounded by `max_seconds`); latencies are what calls return."""
    from bench.load import LoadResult

    result = LoadResult()
    lock = threading.Lock()
    budget = [n]
    deadline = time.monotonic() + max_seconds

    def loop() -> None:
        while time.monotonic() < deadline:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            value = call()
            with lock:
                result.requests += 1
                if isinstance(value, float):
                    result.latencies.append(value)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(loop) for _ in range(threads)]:
            future.result()
    result.seconds = time.perf_counter() - started
    return result


def print_results(module: str, plan_name: str, report: Report, json_path: Path | None) -> str:
    """The run's table under its command, and its JSON when asked; the command, for what follows."""
    command = f"python -m {module}" + {"smoke": " --smoke", "quick": " --quick", "full": ""}[plan_name]
    print()
    print(f"## Results ({command}, {report.seconds:.0f} s)")
    print()
    print(", ".join(f"{k}: {v}" for k, v in report.machine.items()))
    print()
    print(table(report))
    if json_path:
        json_path.write_text(json.dumps(asdict(report) | {"command": command}, indent=2))
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller counts, for development (about 2 minutes)")
    mode.add_argument("--smoke", action="store_true", help="tiny counts, one worker: checks that it runs (< 30 s)")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine as JSON to this file")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (their folder is printed)")
    args = parser.parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-"))
    bench = Bench(plan, log_dir)
    started = time.monotonic()
    try:
        bench.start()
        report = bench.run()
        report.seconds = time.monotonic() - started
    finally:
        bench.stop()
        if not args.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
    print_results("bench.run", plan.name, report, args.json)
    print()
    print("Redis commands per request, by command (ours, then plain RQ):")
    for label, top in report.breakdown.items():
        print(f"- {label}: " + ", ".join(f"{name} {per:.2f}" for name, per in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
