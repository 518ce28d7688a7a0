"""Benchmark: a request's output streamed to SSE clients, each number against a baseline in the same run.

    python -m bench.streaming [--smoke | --quick] [--json FILE]

1. Chunk delivery: `bench.jobs.StampStream` yields the wall-clock time of each `yield`, 10 ms apart; one
   SSE client (httpx + httpx-sse, `GET .../sink?requestId=..&_stream_=true`) records when each chunk event
   arrives: p50/p99 of the difference, against result delivery (the long poll of `bench.run` row 2:
   `bench.jobs.Stamp`, a put, then `GET sink?requestId=..&_timeout_=30s`) measured in the same run.
2. One request yielding N one-byte chunks as fast as it can (`bench.jobs.Burst`): chunks/s reaching one SSE
   client (first chunk to done), against the rate the generator yields them at when iterated directly.
3. 100 concurrent streams at 20 chunks/s each (StampStream, 50 ms apart; one worker process holding all
   100, each starting 3 s after its put so that every client is connected before the first chunk):
   p50/p99 from `yield` to client, against row 1's single stream; the CPU of the API process, of
   Redis and of the worker over the phase (% of one core), and Redis commands per chunk. The 100 clients
   are a lean asyncio SSE reader (HTTP/1.0, a line at a time): httpx-sse's per-event cost in this process,
   on the same CPUs, stalled its own event loop by up to 200 ms under load and was measured with the rest.

Prints one table (ours / baseline). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml
from httpx_sse import connect_sse

from bench import jobs
from bench.run import Report, machine_info, pct, print_results
from queue_service.embedded_redis import RedisServer
from queue_service.testing import ManagedProcess, spawn_api, spawn_worker, stop_all, wait_answering, wait_listening

BIG = 1_000_000
REQUEST_ID = "x-eas-queueservice-request-id"
# Chunks of row 1 not counted: the first ones may be yielded before its client has connected.
WARM_UP = 2
# Row 3's streams start this long after their puts: every client is connected before the first chunk.
START_AFTER_MS = 3000


@dataclass(frozen=True)
class Plan:
    name: str
    delivery_chunks: int
    burst_chunks: int
    streams: int
    stream_chunks: int  # per stream of row 3, 50 ms apart


PLANS = {
    "smoke": Plan("smoke", 30, 2000, 10, 20),
    "quick": Plan("quick", 200, 10_000, 100, 60),
    "full": Plan("full", 500, 30_000, 100, 200),
}


def services() -> list[dict[str, Any]]:
    rpc = {"max_queue_size": BIG, "keepalive": 600_000}
    queue = {"sink": {"max_length": BIG}, "stream": {"max_bytes": 64 * 1024 * 1024}}
    return [
        {"name": "stamps", "processor": "bench.jobs:StampStream", "metadata": {"rpc": {**rpc, "worker_threads": 128}}},
        {"name": "burst", "processor": "bench.jobs:Burst", "metadata": {"rpc": rpc}, "queue": queue},
        {"name": "stamp", "processor": "bench.jobs:Stamp", "metadata": {"rpc": rpc}, "queue": queue},
    ]


async def lean_sse(host: str, port: int, path: str) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of an SSE stream, read over HTTP/1.0 (no chunked encoding: the lines as they come)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        status = await reader.readline()
        assert b" 200 " in status, status
        while await reader.readline() not in (b"\r\n", b"\n", b""):
            pass  # the headers
        kind = ""
        while line := await reader.readline():
            if line.startswith(b"event: "):
                kind = line[7:].strip().decode()
            elif line.startswith(b"data: "):
                yield kind, line[6:].decode()
    finally:
        writer.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StreamBench:
    def __init__(self, plan: Plan, log_dir: Path) -> None:
        self.plan = plan
        self.log_dir = log_dir
        self.server = RedisServer(data_dir=log_dir / "redis")
        self.processes: list[ManagedProcess] = []

    def start(self) -> Report:
        self.server.start()
        self.redis = redis.Redis.from_url(self.server.url)
        services_file = self.log_dir / "services.yaml"
        services_file.write_text(yaml.safe_dump({"services": services()}, sort_keys=False))
        self.api, self.api_url = spawn_api(self.server.url, services_file, log_dir=self.log_dir)
        self.workers = {
            name: spawn_worker(self.server.url, services_file, [name], name=f"qs-bench-{name}", log_dir=self.log_dir)
            for name in ("stamps", "burst", "stamp")
        }
        self.processes += [self.api, *self.workers.values()]
        wait_answering(self.api, f"{self.api_url}/healthz")
        for name, process in self.workers.items():
            wait_listening(process, self.server.url, live_in=[name])
        self.http = httpx.Client(base_url=self.api_url, timeout=60)
        return Report(self.plan.name, machine_info(self.redis.info("server")["redis_version"]))

    def stop(self) -> None:
        self.http.close()
        stop_all(self.processes)
        self.server.stop()

    def put(self, service: str, body: bytes) -> str:
        answer = self.http.post(f"/api/predict/{service}", content=body)
        assert answer.status_code == 200, answer.text
        return answer.headers[REQUEST_ID]

    def read_stream(self, service: str, request_id: str) -> list[tuple[float, str]]:
        """(arrival time, text) of each chunk, to the stream's done."""
        seen = []
        params = {"requestId": request_id, "_stream_": "true"}
        with connect_sse(self.http, "GET", f"/api/predict/{service}/sink", params=params) as source:
            for sse in source.iter_sse():
                if sse.event == "chunk":
                    seen.append((time.time(), json.loads(sse.data)["text"]))
                elif sse.event == "done":
                    assert json.loads(sse.data)["statusCode"] == 200, sse.data
                    break
        return seen

    # 1. -----------------------------------------------------------------------------------------------

    def delivery(self, report: Report) -> list[float]:
        n = self.plan.delivery_chunks
        print(f"1. chunk delivery: {n} chunks 10 ms apart, against result delivery to a long poll", flush=True)
        self.read_stream("stamps", self.put("stamps", b"5 10"))  # warm up
        chunks = self.read_stream("stamps", self.put("stamps", f"{n} 10".encode()))
        # The first chunks may be yielded before the client's stream is open: they measure the connect.
        streamed = [arrived - float(text) for arrived, text in chunks[WARM_UP:]]
        polled = []
        for i in range(min(n, 300) + 3):
            request_id = self.put("stamp", b"x")
            answer = self.http.get(
                "/api/predict/stamp/sink", params={"requestId": request_id, "_timeout_": "30s", "_raw_": "true"}
            )
            received = time.time()
            assert answer.status_code == 200, answer.status_code
            if i >= 3:
                polled.append(received - float(answer.content))
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            report.add(
                "1",
                f"yield to SSE client {name}",
                "ms",
                pct(streamed, q) * 1000,
                "result to a long poll",
                pct(polled, q) * 1000,
                "lower",
            )
        return streamed

    # 2. -----------------------------------------------------------------------------------------------

    def burst(self, report: Report) -> None:
        n = self.plan.burst_chunks
        print(f"2. one request yielding {n} chunks as fast as it can, one SSE client", flush=True)
        self.read_stream("burst", self.put("burst", b"100"))  # warm up
        started = time.perf_counter()
        count = sum(1 for _ in jobs.Burst().process(str(n).encode()))
        direct = count / (time.perf_counter() - started)
        chunks = self.read_stream("burst", self.put("burst", str(n).encode()))
        assert len(chunks) == n, len(chunks)
        rate = n / max(1e-9, chunks[-1][0] - chunks[0][0])
        report.add(
            "2", f"{n} chunks to one SSE client", "chunks/s", rate, "the generator iterated directly", direct, "higher"
        )

    # 3. -----------------------------------------------------------------------------------------------

    def concurrent(self, report: Report, single: list[float]) -> None:
        streams, per_stream = self.plan.streams, self.plan.stream_chunks
        print(f"3. {streams} concurrent streams, {per_stream} chunks each at 20 chunks/s", flush=True)
        bodies = [f"{per_stream} 50 {START_AFTER_MS}".encode()] * streams
        host, port = self.api_url.removeprefix("http://").split(":")

        usage: dict[str, dict[str, float]] = {}

        async def run() -> list[float]:
            limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
            async with httpx.AsyncClient(base_url=self.api_url, timeout=120, limits=limits) as client:
                request_ids = []
                first_put = time.monotonic()
                for body in bodies:
                    answer = await client.post("/api/predict/stamps", content=body)
                    request_ids.append(answer.headers[REQUEST_ID])

                async def one(request_id: str) -> list[float]:
                    delays = []
                    path = f"/api/predict/stamps/sink?requestId={request_id}&_stream_=true"
                    async for kind, data in lean_sse(host, int(port), path):
                        if kind == "chunk":
                            delays.append(time.time() - float(json.loads(data)["text"]))
                        elif kind == "done":
                            break
                    assert len(delays) == per_stream, len(delays)
                    return delays

                streaming = asyncio.gather(*(one(request_id) for request_id in request_ids))
                # The CPU is counted from the first chunk (the streams start START_AFTER_MS after the puts).
                await asyncio.sleep(max(0.0, START_AFTER_MS / 1000 - (time.monotonic() - first_put)))
                usage["before"] = self._usage()
                results = await streaming
                usage["after"] = self._usage()
                return [delay for delays in results for delay in delays]

        delays = asyncio.run(run())
        before, after = usage["before"], usage["after"]
        wall = after["at"] - before["at"]
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            report.add(
                "3",
                f"{streams} streams x 20 chunks/s, yield to client {name}",
                "ms",
                pct(delays, q) * 1000,
                "one stream (row 1)",
                pct(single, q) * 1000,
                "lower",
            )
        chunks = streams * per_stream
        for what, key in (("API process", "api"), ("Redis", "redis"), ("the worker", "worker")):
            share = (after[key] - before[key]) / wall * 100
            report.add("3", f"{streams} streams: {what} CPU", "% of a core", share, "-", float("nan"), "lower")
        commands = (after["commands"] - before["commands"]) / chunks
        report.add("3", f"{streams} streams: Redis commands per chunk", "/chunk", commands, "-", float("nan"), "lower")

    def _usage(self) -> dict[str, float]:
        info = self.redis.info()
        return {
            "api": cpu_seconds(self.api.pid),
            "worker": cpu_seconds(self.workers["stamps"].pid),
            "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            "commands": float(info["total_commands_processed"]),
            "at": time.monotonic(),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller counts")
    mode.add_argument("--smoke", action="store_true", help="tiny counts: checks that it runs")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine as JSON to this file")
    args = parser.parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    log_dir = Path(tempfile.mkdtemp(prefix="qs-bench-streaming-"))
    bench = StreamBench(plan, log_dir)
    started = time.monotonic()
    try:
        report = bench.start()
        single = bench.delivery(report)
        bench.burst(report)
        bench.concurrent(report, single)
        report.seconds = time.monotonic() - started
    finally:
        bench.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    print_results("bench.streaming", plan.name, report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
