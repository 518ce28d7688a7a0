"""The failure tests' stack (a real redis-server, API and rq workers) and the audit every test ends with.

The audit is the issue's acceptance rule: every request id that was accepted is in exactly one
terminal state (a result in the sink, a result a test client already read and deleted, or
deliberately withdrawn), nothing is left in an input queue, and no request was processed to
completion twice unless a worker died holding it.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis

from queue_service.embedded_redis import RedisServer
from queue_service.protocol import REQUEST_ID_HEADER
from queue_service.store import connection, keys
from queue_service.store.keys import WORKER_GROUP
from queue_service.testing import ManagedProcess, start_api, start_worker
from tests.failure.processors import CALLS_ENV
from tests.support.waiting import wait_until

T = TypeVar("T")
CHAOS = "tests.failure.processors:Chaos"
ASYNC_CHAOS = "tests.failure.processors:AsyncChaos"
BATCH_CHAOS = "tests.failure.processors:BatchChaos"


@dataclass
class Run:
    """One call of the processor on one request, in one worker process."""

    token: str
    pid: int
    started: float
    ended: float | None = None
    outcome: str | None = None  # "ok" (completed), "raised" (stopped), None (the process died)


def read_runs(path: Path) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = defaultdict(list)
    open_runs: dict[tuple[str, int], Run] = {}
    if not path.exists():
        return runs
    for line in path.read_text().splitlines():
        record = json.loads(line)
        token, pid = record["token"], record["pid"]
        if record["event"] == "start":
            run = open_runs[token, pid] = Run(token, pid, record["t"])
            runs[token].append(run)
        elif (token, pid) in open_runs:
            run = open_runs.pop((token, pid))
            run.ended, run.outcome = record["t"], record["outcome"]
    return runs


@dataclass
class Accepted:
    """A put that the API answered 200 (or that a test found stored after the API died)."""

    service: str
    token: str
    request_id: str
    index: int


@dataclass
class Put:
    """One put as the client saw it: the token of its order and the API's answer."""

    service: str
    token: str
    answer: httpx.Response

    @property
    def status_code(self) -> int:
        return self.answer.status_code

    @property
    def request_id(self) -> str:
        return self.answer.headers.get(REQUEST_ID_HEADER, "")

    @property
    def index(self) -> int:
        return int(self.answer.text)


@dataclass
class SinkItem:
    request_id: str
    tags: dict[str, str]
    data: bytes
    message: str

    @property
    def last_code(self) -> int:
        return int(self.tags.get("lastCode", "200"))


@dataclass
class Stack:
    """Everything one failure test runs: its own Redis, API processes and workers, and its ledger."""

    tmp_path: Path
    redis_server: RedisServer
    services_file: Path
    apis: list[ManagedProcess] = field(default_factory=list)
    workers: list[ManagedProcess] = field(default_factory=list)
    url: str = ""
    accepted: dict[str, Accepted] = field(default_factory=dict)  # by request id
    withdrawn: set[str] = field(default_factory=set)  # deleted on purpose: no result expected
    excused: set[int] = field(default_factory=set)  # workers a test stopped or stalled: they may lose work
    consumed: dict[str, SinkItem] = field(default_factory=dict)  # results a test read with auto-delete
    # Puts whose answer said nothing certain (a 503 after the script may have run: a connection lost mid-put,
    # a write no replica confirmed): each may be stored or not, and ends in at most one terminal state.
    in_doubt: set[str] = field(default_factory=set)  # tokens
    _tokens: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.log_dir = self.tmp_path / "logs"
        self.calls_path = self.tmp_path / "calls.jsonl"
        # Any URL kind (a Sentinel setup's URL follows its primary through a failover).
        self.store: redis.Redis = connection.sync_client(self.redis_server.url, 5)

    # --- processes ----------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        return {CALLS_ENV: str(self.calls_path)}

    def start_api(self, env: Mapping[str, str] | None = None) -> str:
        process, url = start_api(
            self.redis_server.url, self.services_file, env={**self.env, **(env or {})}, log_dir=self.log_dir
        )
        self.apis.append(process)
        self.url = self.url or url
        return url

    def start_worker(self, *services: str, env: Mapping[str, str] | None = None) -> ManagedProcess:
        process = start_worker(
            self.redis_server.url, self.services_file, services, env={**self.env, **(env or {})}, log_dir=self.log_dir
        )
        self.workers.append(process)
        return process

    def start_workers(self, count: int, *services: str, env: Mapping[str, str] | None = None) -> list[ManagedProcess]:
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda _: self.start_worker(*services, env=env), range(count)))

    def terminate(self, worker: ManagedProcess) -> None:
        self.excused.add(worker.pid)
        worker.terminate()

    def dead_pids(self) -> set[int]:
        """Workers that died (SIGKILL, the watchdog): the only ones allowed to leave a run unfinished."""
        return {w.pid for w in self.workers if w.returncode not in (None, 0)}

    def stop(self) -> None:
        for process in [*self.workers, *self.apis]:
            process.stop()
        self.store.close()

    # --- requests -----------------------------------------------------------------------

    def new_token(self) -> str:
        return f"t-{next(self._tokens)}"

    def order(self, token: str | None = None, **order: Any) -> tuple[str, bytes]:
        token = token or self.new_token()
        return token, json.dumps({"token": token, **order}).encode()

    def put(self, service: str, *, timeout: float = 10, **order: Any) -> Put:
        """Put one order; a 200 goes into the ledger of accepted requests."""
        token, body = self.order(**order)
        return self.record(
            Put(service, token, httpx.post(f"{self.url}/api/predict/{service}", content=body, timeout=timeout))
        )

    def record(self, put: Put) -> Put:
        if put.status_code == 200:
            self.accept(put.service, put.token, put.request_id, put.index)
        return put

    def accept(self, service: str, token: str, request_id: str, index: int) -> Accepted:
        self.accepted[request_id] = accepted = Accepted(service, token, request_id, index)
        return accepted

    def delete(self, service: str, index: int) -> None:
        answer = httpx.delete(f"{self.url}/api/predict/{service}", params={"_indexes_": str(index)}, timeout=10)
        assert answer.status_code == 200, answer.text

    def take_result(self, service: str, request_id: str, timeout: float = 10) -> SinkItem | None:
        """Read (and delete) one result as a client would; the ledger remembers it for the audit."""
        answer = httpx.get(
            f"{self.url}/api/predict/{service}/sink",
            params={"requestId": request_id, "_timeout_": f"{timeout:g}s", "_auto_delete_": "true"},
            timeout=timeout + 10,
        )
        if answer.status_code == 204:
            return None
        assert answer.status_code == 200, answer.text
        [frame] = answer.json()
        item = SinkItem(request_id, frame["tags"], base64.b64decode(frame["data"]), frame["message"])
        self.consumed[request_id] = item
        return item

    # --- what happened ------------------------------------------------------------------

    def runs(self) -> dict[str, list[Run]]:
        return read_runs(self.calls_path)

    def running(self) -> dict[int, str]:
        """Live worker pid -> the token it is processing now."""
        live = {w.pid for w in self.workers if w.is_running()}
        return {
            run.pid: token
            for token, runs in self.runs().items()
            for run in runs
            if run.ended is None and run.pid in live
        }

    def open_runs(self) -> dict[int, list[str]]:
        """Live worker pid -> the tokens it is processing now (several for a batch or concurrent requests)."""
        live = {w.pid for w in self.workers if w.is_running()}
        found: dict[int, list[str]] = defaultdict(list)
        for token, runs in self.runs().items():
            for run in runs:
                if run.ended is None and run.pid in live:
                    found[run.pid].append(token)
        return found

    def sink_items(self, service: str) -> list[SinkItem]:
        items = []
        for stream in keys.sink_queue(service).streams:
            for _, fields in self.store.xrange(stream):
                items.append(
                    SinkItem(
                        fields[b"rid"].decode(),
                        json.loads(fields[b"tags"]),
                        fields[b"data"],
                        fields.get(b"message", b"").decode(),
                    )
                )
        return items

    def input_left(self, service: str) -> int:
        qi = keys.input_queue(service)
        return sum(int(self.store.xlen(stream)) for stream in qi.streams)

    def results(self) -> dict[str, list[SinkItem]]:
        """Request id -> its terminal items: what is in the sinks plus what test clients consumed."""
        found: dict[str, list[SinkItem]] = defaultdict(list)
        for service in {a.service for a in self.accepted.values()}:
            for item in self.sink_items(service):
                found[item.request_id].append(item)
        for request_id, item in self.consumed.items():
            found[request_id].append(item)
        return found

    def settled(self) -> bool:
        """Every accepted request has reached a terminal state (or was withdrawn)."""
        results = self.results()
        return all(rid in results or rid in self.withdrawn for rid in self.accepted)

    def wait_settled(self, timeout: float) -> None:
        wait_until(self.settled, timeout, f"all {len(self.accepted)} accepted requests in a terminal state", 0.2)

    def _counter_drift(self, service: str) -> list[str]:
        """The store's counters against a recount of the streams (they must agree when all is settled)."""
        counts = {k.decode(): int(v) for k, v in self.store.hgetall(keys.counts(service)).items()}
        sink = keys.sink_queue(service)
        results = sum(int(self.store.xlen(stream)) for stream in sink.streams)
        data = sum(len(f.get(b"data", b"")) for stream in sink.streams for _, f in self.store.xrange(stream))
        expected = {"waiting": self.input_left(service), "sink_used": results, "sink_bytes": data}
        return [
            f"{service}: counter {name} is {counts.get(name, 0)}, the streams say {value}"
            for name, value in expected.items()
            if counts.get(name, 0) != value
        ]

    def audit(self, services: Sequence[str] = ()) -> Counter[int]:
        """The acceptance rule of the issue; returns how many requests ended with each status."""
        results = self.results()
        runs = self.runs()
        dead = self.dead_pids()
        by_token = {a.token: a for a in self.accepted.values()}
        problems: list[str] = []
        for service in {*services, *(a.service for a in self.accepted.values())}:
            if left := self.input_left(service):
                problems.append(f"{service}: {left} item(s) stuck in the input queue")
            for stream in keys.input_queue(service).streams:
                if self.store.exists(stream) and self.store.xinfo_groups(stream):
                    pending = self.store.xpending(stream, WORKER_GROUP)["pending"]
                    if pending:
                        problems.append(f"{stream}: {pending} item(s) still held by workers")
            if stray := self.store.hlen(keys.input_queue(service).ids):
                problems.append(f"{service}: {stray} request id(s) left in the input index")
            problems += self._counter_drift(service)
        doubtful: Counter[str] = Counter()
        for request_id, items in results.items():
            if request_id in self.accepted:
                continue
            tokens = {_token_of(item) for item in items}
            if len(items) == 1 and tokens <= self.in_doubt:
                doubtful.update(tokens)
            else:
                problems.append(f"a result for {request_id}, which was never accepted")
        problems += [f"{token} (in doubt) has {n} results" for token, n in doubtful.items() if n > 1]
        statuses: Counter[int] = Counter()
        for request_id, accepted in self.accepted.items():
            terminal = len(results.get(request_id, [])) + (request_id in self.withdrawn)
            if terminal != 1:
                problems.append(f"{request_id} ({accepted.token}) is in {terminal} terminal states")
                continue
            token_runs = runs.get(accepted.token, [])
            if request_id in self.withdrawn:
                statuses[0] += 1
                if token_runs:
                    problems.append(f"{accepted.token} was withdrawn before it started, yet it ran")
                continue
            [item] = results[request_id]
            statuses[item.last_code] += 1
            # A run may be repeated only when its worker died, or was stopped (or stalled) by the test.
            lived = [r for r in token_runs if r.pid not in dead | self.excused]
            if len(lived) > 1:
                problems.append(f"{accepted.token} was started {len(lived)} times by workers that lived: {lived}")
            unfinished = [r for r in token_runs if r.outcome is None and r.pid not in dead]
            if unfinished:
                problems.append(f"{accepted.token} has runs that never ended in live workers {unfinished}")
            if item.last_code == 200:
                answer = json.loads(item.data)
                if not any(r.outcome == "ok" and r.pid == answer["pid"] for r in token_runs):
                    problems.append(f"{accepted.token}: the result names a run that did not complete: {answer}")
        for token in runs:
            if token not in by_token and token not in self.in_doubt:
                problems.append(f"{token} ran but was never accepted")
        assert not problems, "audit failed:\n" + "\n".join(problems)
        return statuses


def assert_backlog_handed_on(
    stack: Stack, stopped: ManagedProcess, service: str, tokens: Sequence[str], lease_seconds: float
) -> None:
    """A worker stopped (exit 0) with a backlog of `tokens` left: every item it ran has its result, what it still
    holds is free at once (idle past its lease in Redis: released, not left to lapse), and each item left runs
    once on the next worker, soon after it starts."""
    assert stopped.wait(60) == 0
    ran = {token for token, runs in stack.runs().items() if any(r.pid == stopped.pid for r in runs)}
    assert 0 < len(ran) < len(tokens)  # it stopped with a backlog left
    results = stack.results()
    request_ids = {a.token: a.request_id for a in stack.accepted.values()}
    assert all(request_ids[token] in results for token in ran)
    stream = keys.input_queue(service).normal
    held = stack.store.xpending_range(stream, WORKER_GROUP, "-", "+", len(tokens))
    assert held and all(entry["time_since_delivered"] >= lease_seconds * 1000 for entry in held)
    other = stack.start_worker(service)
    ready_at = time.time()
    stack.wait_settled(30)
    runs = stack.runs()
    left = [token for token in tokens if token not in ran]
    assert all([r.pid for r in runs[token]] == [other.pid] for token in left)  # each ran once, there
    assert max(runs[token][0].started for token in left) - ready_at < lease_seconds / 2
    assert stack.audit() == {200: len(tokens)}


def _token_of(item: SinkItem) -> str:
    """The order's token a Chaos result names ("" for a result with no answer of the processor in it)."""
    try:
        return str(json.loads(item.data)["token"])
    except (ValueError, KeyError, TypeError):
        return ""
