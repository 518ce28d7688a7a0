"""Redis CPU per item of each script on an async request's path, alone: put, take, finish, deliver, commit.

    python -m bench.script_cost [--items 4000] [--rounds 3] [--redis-arg=--stream-node-max-entries=16]

On a redis-server of its own, with no API and no worker process: `--items` puts sent 16 calls per pipeline;
takes of 4 items; finishes of the 4 taken together (one call: a chain's); deliveries of 16 to a client group;
commits of what each delivery gave. Each step runs alone and is measured alone (INFO `used_cpu_*`), one
call per round trip except the puts, so what a step costs includes its round trips as a busy worker or
watch pays them. Prints per round each step's µs per item and their sum, then the medians: where row 5's
async Redis CPU goes, script by script, without the noise of the HTTP side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import redis

from bench import redis_cost
from queue_service.embedded_redis import RedisServer
from queue_service.store import keys, scripts
from queue_service.store.consumer import Finish, TakeRules, WorkerStore
from queue_service.store.model import DataFrame, Item, Outcome

SERVICE = "cost"
RULES = TakeRules(lease_ms=30_000, max_delivery=3, sink_max_items=0, sink_max_bytes=0)
GROUP = "bench"
STEPS = ("put", "take (4)", "finish (4)", "deliver (16)", "commit (16)")


def now_ms() -> int:
    return int(time.time() * 1000)


def one_round(client: redis.Redis, n: int, round_no: int) -> dict[str, float]:
    """Each step's Redis CPU µs per item over n items."""
    run = scripts.Scripts(client).run_many
    worker = WorkerStore(client, "worker", lease_seconds={SERVICE: RULES.lease_ms / 1000})
    qi, qs = keys.input_queue(SERVICE), keys.sink_queue(SERVICE)
    took: list[list[Item]] = []
    delivered: list[list[DataFrame]] = []

    def put() -> None:
        for start in range(0, n, 16):
            rids = (f"{round_no}-{i}" for i in range(start, min(start + 16, n)))
            run([scripts.put(qi, data=b"x" * 16, tags={}, request_id=r, now_ms=now_ms()) for r in rids], client)

    def take() -> None:
        while sum(map(len, took)) < n:
            took.append(worker.take(SERVICE, RULES, want=4).items)

    def finish() -> None:
        for items in took:
            worker.finish_many([Finish(item, Outcome(b"y" * 16), 0.001) for item in items])

    def deliver() -> None:
        call = scripts.deliver(qs, group=GROUP, consumer="c", want=16, lease_ms=0, tags=None, max_bytes=1 << 20)
        while sum(map(len, delivered)) < n:
            [delivery] = run([call], client)
            assert delivery is not None and not isinstance(delivery, Exception) and delivery.frames
            delivered.append(delivery.frames)

    def commit() -> None:
        for frames in delivered:
            run([scripts.remove(qs, "indexes", [f.index for f in frames], now_ms=now_ms(), group=GROUP)], client)

    steps: list[Callable[[], None]] = [put, take, finish, deliver, commit]
    costs: dict[str, float] = {}
    for name, step in zip(STEPS, steps, strict=True):
        before = redis_cost.snapshot(client)
        step()
        costs[name] = (redis_cost.snapshot(client).cpu - before.cpu) / n * 1e6
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.script_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-arg", action="append", default=[], help="passed to redis-server (repeatable)")
    args = parser.parse_args(argv)
    server = RedisServer(extra_args=[part for arg in args.redis_arg for part in arg.split("=", 1)]).start()
    try:
        client = redis.Redis.from_url(server.url)
        qs = keys.sink_queue(SERVICE)
        WorkerStore(client, "worker").take(SERVICE, RULES)  # makes the workers' group
        join = scripts.join(qs, GROUP, start_index=1, now_ms=now_ms(), max_groups=4, idle_ms=600_000)
        scripts.Scripts(client).run_many([join], client)
        rounds = []
        for round_no in range(args.rounds):
            costs = one_round(client, args.items, round_no)
            rounds.append(costs)
            print("  ".join(f"{k} {v:.1f}" for k, v in costs.items()), f"| sum {sum(costs.values()):.1f} µs/item")
        medians = {step: statistics.median(r[step] for r in rounds) for step in STEPS}
        print(f"\nmedians over {args.rounds} rounds of {args.items} items (Redis CPU µs per item):")
        for step, value in medians.items():
            print(f"  {step:14s} {value:6.1f}")
        print(f"  {'sum':14s} {sum(medians.values()):6.1f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
