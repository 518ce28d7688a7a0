"""Benchmark: what a Sentinel failover costs, with and without `queue.durability: replicated`.

    python -m bench.failover [--rounds N] [--clients C]

Each round starts a Sentinel setup (tests/support/sentinel.py: primary, replicas, three Sentinels, the same
redis-server binary as the embedded default) and one API process on its `redis+sentinel://` URL, puts from
C clients, SIGKILLs the primary, and keeps putting until puts are accepted again. Then it counts the
accepted-but-lost requests: puts answered 200 whose request id the new primary does not have. Printed per
mode: puts/s and put latency before the kill, the time from the kill to the first accepted put, and the loss.

Modes: `primary` (a put is acknowledged once the primary has it; one replica), `replicated` with one replica
(WAIT 1: after the failover nothing can confirm a write until the old primary is back as a replica, which
this bench restarts once the failover is done, as a supervisor would) and `replicated` with two replicas.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import Http
from queue_service.protocol import REQUEST_ID_HEADER
from queue_service.store import connection, keys
from queue_service.testing import start_api, write_services
from tests.support.sentinel import SentinelSetup

SERVICE = "bench"
LOAD_BEFORE_KILL_SECONDS = 3.0
LOAD_AFTER_RECOVERY_SECONDS = 1.0
GIVE_UP_SECONDS = 60.0


@dataclass
class Round:
    accepted: dict[str, float] = field(default_factory=dict)  # request id -> when it was sent
    latencies: list[float] = field(default_factory=list)  # before the kill
    unavailable: int = 0
    other: int = 0
    killed_at: float = 0.0
    promoted_after: float = 0.0
    lost: int = 0
    answered_after: list[float] = field(default_factory=list)  # answers to puts sent after the kill

    @property
    def first_accepted_after(self) -> float:
        """From the kill to the first answer 200 to a put sent after it (NaN: none yet)."""
        return min(self.answered_after, default=float("nan")) - self.killed_at


def _one_round(base: Path, durability: str, replicas: int, clients: int, payload: bytes) -> Round:
    services = write_services(
        base / "services.yaml",
        [
            {
                "name": SERVICE,
                "processor": "workers.examples:Echo",
                "metadata": {"rpc": {"max_queue_size": 10_000_000}},
                "queue": {"durability": durability, "replication_timeout_ms": 1000},
            }
        ],
    )
    result = Round()
    stop = threading.Event()
    lock = threading.Lock()
    with SentinelSetup(base / "sentinel", replicas=replicas) as setup:
        api, url = start_api(setup.url, services, log_dir=base / "logs")
        try:

            def client() -> None:
                http = Http(url)
                try:
                    while not stop.is_set():
                        sent, sent_at = time.perf_counter(), time.monotonic()
                        try:
                            status, headers, _ = http.request("POST", f"/api/predict/{SERVICE}", payload)
                        except OSError:
                            http.close()
                            http = Http(url)
                            continue
                        with lock:
                            if status == 200:
                                result.accepted[headers[REQUEST_ID_HEADER.lower()]] = sent_at
                                if sent_at > result.killed_at > 0:
                                    result.answered_after.append(time.monotonic())
                                if not result.killed_at:
                                    result.latencies.append(time.perf_counter() - sent)
                            elif status == 503:
                                result.unavailable += 1
                            else:
                                result.other += 1
                finally:
                    http.close()

            # Daemon threads, stopped in `finally`: a round that fails must not leave clients spinning.
            threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
            for thread in threads:
                thread.start()
            try:
                time.sleep(LOAD_BEFORE_KILL_SECONDS)
                old = setup.kill_primary()
                result.killed_at = time.monotonic()
                setup.wait_failover(old, timeout=GIVE_UP_SECONDS)
                result.promoted_after = time.monotonic() - result.killed_at
                if durability == "replicated" and replicas == 1:
                    setup.rejoin(old, timeout=GIVE_UP_SECONDS)
                deadline = result.killed_at + GIVE_UP_SECONDS
                while time.monotonic() < deadline and result.first_accepted_after != result.first_accepted_after:
                    time.sleep(0.05)  # NaN until the first put after the kill is accepted
                time.sleep(LOAD_AFTER_RECOVERY_SECONDS)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=60)
            store = connection.sync_client(setup.url, 10)
            try:
                stored = {rid.decode() for rid in store.hkeys(keys.input_queue(SERVICE).ids)}
            finally:
                store.close()
            result.lost = sum(1 for rid in result.accepted if rid not in stored)
        finally:
            api.stop()
    return result


def _latency_side_by_side(base: Path, clients: int, payload: bytes, seconds: float = 8.0) -> dict[str, list[float]]:
    """Put latency of a `primary` and a `replicated` service in one run, each client alternating between them:
    the cost of WAIT measured at the same moment, on the same machine load."""
    services = write_services(
        base / "services.yaml",
        [
            {
                "name": name,
                "processor": "workers.examples:Echo",
                "metadata": {"rpc": {"max_queue_size": 10**7}},
                "queue": {"durability": name},
            }
            for name in ("primary", "replicated")
        ],
    )
    latencies: dict[str, list[float]] = {"primary": [], "replicated": []}
    lock = threading.Lock()
    with SentinelSetup(base / "sentinel") as setup:
        api, url = start_api(setup.url, services, log_dir=base / "logs")
        deadline = time.monotonic() + seconds

        def client() -> None:
            http = Http(url)
            try:
                while time.monotonic() < deadline:
                    for name in latencies:
                        sent = time.perf_counter()
                        status, _, _ = http.request("POST", f"/api/predict/{name}", payload)
                        if status == 200:
                            with lock:
                                latencies[name].append(time.perf_counter() - sent)
            finally:
                http.close()

        try:
            threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=seconds + 60)
        finally:
            api.stop()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="failovers per mode (default 3)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent putting clients (default 8)")
    parser.add_argument("--payload", type=int, default=100, help="bytes per item (default 100)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qs-failover-") as base:
        side = _latency_side_by_side(Path(base), args.clients, b"x" * args.payload)
    print("put latency, both services in one run, each client alternating (one replica):")
    for name, values in side.items():
        values.sort()
        print(
            f"  durability {name:<10} p50 {values[len(values) // 2] * 1000:.2f} ms  "
            f"p99 {values[int(len(values) * 0.99)] * 1000:.2f} ms  ({len(values)} puts)"
        )
    modes = [("primary", 1), ("replicated", 1), ("replicated", 2)]
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"{args.rounds} failover(s) per mode, {args.clients} clients putting {args.payload}-byte items, no workers")
    print(f"(load average {load} at the start)")
    header = (
        f"{'durability':<11} {'replicas':>8} {'puts/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'promoted s':>10} "
        f"{'first put s':>11} {'accepted':>9} {'lost':>5}"
    )
    print(header)
    for durability, replicas in modes:
        rounds = []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="qs-failover-") as base:
                rounds.append(_one_round(Path(base), durability, replicas, args.clients, b"x" * args.payload))
        latencies = sorted(x for r in rounds for x in r.latencies)
        puts_per_second = statistics.mean(len(r.latencies) / LOAD_BEFORE_KILL_SECONDS for r in rounds)
        print(
            f"{durability:<11} {replicas:>8} {puts_per_second:>7.0f} "
            f"{latencies[len(latencies) // 2] * 1000:>7.2f} {latencies[int(len(latencies) * 0.99)] * 1000:>7.2f} "
            f"{statistics.mean(r.promoted_after for r in rounds):>10.1f} "
            f"{statistics.mean(r.first_accepted_after for r in rounds):>11.1f} "
            f"{sum(len(r.accepted) for r in rounds):>9} {sum(r.lost for r in rounds):>5}"
            f"   (lost per round: {[r.lost for r in rounds]})"
        )


if __name__ == "__main__":
    main()
