"""Issue 9, items 2, 3 and 10: floods of long polls, of made-up consumer groups and of idle watches.

Heavy (1,200 sockets, 2,000 watches, 500 held watches): run them on their own with
`python -m pytest tests/hostile/test_floods.py`. Each test gathers everything it observed and
fails once, naming every broken promise, so one run shows the whole picture.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from dataclasses import dataclass

import httpx
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.protocol import State

from queue_service.testing import ManagedProcess
from tests.conftest import ServicesFileFactory
from tests.hostile.probes import commands_executed, connected_clients, group_names
from tests.hostile.raw_http import RawAnswer, close, host_port, read_answer, request_head
from tests.hostile.watching import GID_HEADER, UID_HEADER, ws_url
from tests.integration.conftest import ECHO, REQUEST_ID, ApiFactory, WorkerFactory

pytestmark = pytest.mark.integration


# --- item 2: abandoned long polls ---------------------------------------------------------

LONG_POLLERS = 1200
LONG_POLL = "/api/predict/open/sink?_index_=999999999&_timeout_=45s"
ABANDON_AFTER_SECONDS = 2.0
ROUND_TRIP_BOUND_SECONDS = 10.0
REDIS_CLIENTS_BOUND = 150
REDIS_SETTLE_SECONDS = 10.0
# Of the 1,200, at least this many must be told "too many long polls" before they leave: the
# per-service bound (128) leaves over a thousand to refuse.
REFUSED_AT_LEAST = 100
# "At once": far from the 45 s a held poll would take, even on a machine where everything is slow.
REFUSED_AT_ONCE_MS = 15_000


@dataclass(frozen=True)
class RoundTrip:
    started: float  # monotonic
    put_status: int | None
    get_status: int | None
    seconds: float
    error: str = ""

    def ok(self) -> bool:
        return self.put_status == 200 and self.get_status == 200 and self.seconds <= ROUND_TRIP_BOUND_SECONDS


async def abandoned_long_poll(host: str, port: int) -> RawAnswer | None:
    """One client: a 45 s long poll of `open`, abandoned after 2 s; the answer it got before leaving, if any."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request_head("GET", LONG_POLL, f"{host}:{port}"))
        await writer.drain()
        return await read_answer(reader, ABANDON_AFTER_SECONDS)
    finally:
        await close(writer)


async def echo_round_trips(base_url: str, stop: asyncio.Event, trips: list[RoundTrip]) -> None:
    """Another client, of `echo`: put, then get the result by request id, until told to stop."""
    async with httpx.AsyncClient(base_url=base_url, timeout=ROUND_TRIP_BOUND_SECONDS + 10) as http:
        while not stop.is_set():
            started = time.monotonic()
            put_status = get_status = None
            try:
                put = await http.post("/api/predict/echo", content=b"still served?")
                put_status = put.status_code
                if put_status == 200:
                    got = await http.get(
                        "/api/predict/echo/sink",
                        params={"requestId": put.headers[REQUEST_ID], "_timeout_": "5s"},
                    )
                    get_status = got.status_code
                trips.append(RoundTrip(started, put_status, get_status, time.monotonic() - started))
            except httpx.HTTPError as exc:
                trips.append(RoundTrip(started, put_status, get_status, time.monotonic() - started, repr(exc)))
            await asyncio.sleep(0.2)


def wait_for_log_lines(process: ManagedProcess, path: str, count: int, seconds: float) -> list[dict]:
    """The API's JSON log lines for `path`, once `count` of them are written (or `seconds` pass)."""
    deadline = time.monotonic() + seconds
    while True:
        lines = []
        for text in process.log_text().splitlines():
            if text.startswith("{") and f'"path": "{path}"' in text:
                lines.append(json.loads(text))
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


def describe_trips(trips: list[RoundTrip]) -> str:
    bad = [t for t in trips if not t.ok()]
    shown = ", ".join(f"put {t.put_status} get {t.get_status} {t.seconds:.1f} s {t.error}".strip() for t in bad[:5])
    return f"{len(bad)} of {len(trips)} echo round trips failed ({shown})"


@pytest.mark.quiet  # 1,200 clients at once: on a box busy with 6 other tests the API reads few before they leave
def test_abandoned_long_polls_release_redis_and_leave_other_services_served(
    api: ApiFactory, worker: WorkerFactory, services_file: ServicesFileFactory, redis_url: str
) -> None:
    path = services_file([{"name": "echo", "processor": ECHO}, {"name": "open", "processor": ECHO}])
    service = api(services_file=path)
    worker("echo", services_file=path)
    host, port = host_port(service.url)
    store = redis.Redis.from_url(redis_url)

    async def attack() -> tuple[list[RoundTrip], list[RawAnswer | BaseException | None], float, list[int]]:
        trips: list[RoundTrip] = []
        stop = asyncio.Event()
        prober = asyncio.create_task(echo_round_trips(service.url, stop, trips))
        answers = await asyncio.gather(
            *(abandoned_long_poll(host, port) for _ in range(LONG_POLLERS)), return_exceptions=True
        )
        all_left = time.monotonic()
        clients_seen = [connected_clients(store)]
        while clients_seen[-1] >= REDIS_CLIENTS_BOUND and time.monotonic() - all_left < REDIS_SETTLE_SECONDS:
            await asyncio.sleep(0.5)
            clients_seen.append(connected_clients(store))
        # Afterwards too: a few round trips once the flood has left.
        while sum(t.started > all_left for t in trips) < 3 and time.monotonic() - all_left < 60:
            await asyncio.sleep(0.2)
        stop.set()
        await prober
        return trips, answers, all_left, clients_seen

    try:
        trips, answers, all_left, clients_seen = asyncio.run(attack())
    finally:
        store.close()

    problems = []
    during, after = [t for t in trips if t.started <= all_left], [t for t in trips if t.started > all_left]
    if not during or not all(t.ok() for t in during):
        problems.append(f"during the flood: {describe_trips(during)}")
    if not all(t.ok() for t in after):
        problems.append(f"after the flood: {describe_trips(after)}")
    if clients_seen[-1] >= REDIS_CLIENTS_BOUND:
        problems.append(
            f"Redis still held {clients_seen[-1]} client connections {REDIS_SETTLE_SECONDS:g} s after the "
            f"{LONG_POLLERS} clients left (bound {REDIS_CLIENTS_BOUND}; seen {clients_seen[0]} at once)"
        )
    got = [a for a in answers if isinstance(a, RawAnswer)]
    refused = [a for a in got if a.status == 429 and "long poll" in a.detail().lower()]
    # On a starved machine the 429 may come after the client already left (2 s): the API's own log line says
    # it refused at once all the same (well before the poll's 45 s), which is what the promise is about.
    logged = [
        line["duration_ms"]
        for line in wait_for_log_lines(service.process, "/api/predict/open/sink", LONG_POLLERS, seconds=30)
        if line["status"] == 429
    ]
    refused_at_once = sum(1 for duration in logged if duration < REFUSED_AT_ONCE_MS)
    seen_refused = max(len(refused), refused_at_once)
    slowest = max((t.seconds for t in trips), default=0.0)
    print(
        f"\nRELIABILITY {LONG_POLLERS} abandoned long polls: {seen_refused} refused with 429 at once "
        f"({len(refused)} seen by their clients); Redis connections {clients_seen[0]} as they left, "
        f"{clients_seen[-1]} after; {len(trips)} echo round trips meanwhile, {sum(t.ok() for t in trips)} ok, "
        f"slowest {slowest:.2f} s"
    )
    if seen_refused < REFUSED_AT_LEAST:
        statuses = sorted({a.status for a in got})
        errors = sum(isinstance(a, BaseException) for a in answers)
        problems.append(
            f"only {seen_refused} of {LONG_POLLERS} long polls were refused with 429 'long polls' at once "
            f"(answers their clients saw, by status {statuses}: {len(got)}; connect errors {errors}; "
            f"e.g. {got[0] if got else None}; 429s in the API's log: {len(logged)})"
        )
    assert not problems, "\n".join(problems)


# --- item 3: made-up consumer groups ------------------------------------------------------

GROUP_FLOOD = 2000
GROUP_FLOOD_CONCURRENCY = 8
MAX_GROUPS = 32
PUTS_MEASURED = 50
SINK_STREAMS = ("qs:{echo}:sink", "qs:{echo}:sink:high")


def redis_calls_per_put(store: redis.Redis, http: httpx.Client) -> float:
    """Commands Redis runs per put to `echo` (no worker runs, so nothing else is going on)."""
    before = commands_executed(store)
    for _ in range(PUTS_MEASURED):
        assert http.post("/api/predict/echo", content=b"cost?").status_code == 200
    return (commands_executed(store) - before) / PUTS_MEASURED


def redis_calls_per_commit(store: redis.Redis, http: httpx.Client) -> float:
    """Commands Redis runs per result put into the sink and committed (a commit once acknowledged every group)."""
    before = commands_executed(store)
    for _ in range(PUTS_MEASURED):
        put = http.post("/api/predict/echo/sink", content=b"cost?")
        assert put.status_code == 200
        assert http.put("/api/predict/echo/sink", params={"_indexes_": put.text}).status_code == 200
    return (commands_executed(store) - before) / PUTS_MEASURED


def xinfo_calls(store: redis.Redis) -> int:
    return int(store.info("commandstats").get("cmdstat_xinfo", {}).get("calls", 0))


async def watch_once(url: str, group: str) -> bool:
    """One watch in a made-up group: open it, take the item waiting in the sink, leave; True when it got it."""
    headers = {GID_HEADER: group, UID_HEADER: f"u-{secrets.token_hex(4)}"}
    try:
        async with connect(url, additional_headers=headers, open_timeout=30, ping_interval=None) as ws:
            await asyncio.wait_for(ws.recv(), 5)
            return True
    except (TimeoutError, ConnectionClosed, InvalidHandshake, OSError):
        return False


def test_made_up_consumer_groups_stay_bounded_and_puts_cost_what_they_did(
    api: ApiFactory, services_file: ServicesFileFactory, redis_url: str
) -> None:
    # Room for the measured puts: no worker takes them.
    path = services_file([{"name": "echo", "processor": ECHO, "metadata": {"rpc": {"max_queue_size": 1000}}}])
    service = api(services_file=path)
    store = redis.Redis.from_url(redis_url)
    url = ws_url(service.url, "/api/predict/echo/sink", _watch_="true", _window_="1")

    async def flood() -> int:
        gate = asyncio.Semaphore(GROUP_FLOOD_CONCURRENCY)

        async def one() -> bool:
            async with gate:
                return await watch_once(url, f"g-{secrets.token_hex(8)}")

        return sum(await asyncio.gather(*(one() for _ in range(GROUP_FLOOD))))

    try:
        with service.client() as http:
            cost_before = redis_calls_per_put(store, http)
            commit_before = redis_calls_per_commit(store, http)
            # An item every new group is delivered, so each watch surely made its group before leaving.
            assert http.post("/api/predict/echo/sink", content=b"for every group").status_code == 200
            delivered = asyncio.run(flood())

            def groups() -> dict[str, int]:
                return {stream: len(group_names(store, stream)) for stream in SINK_STREAMS}

            deadline = time.monotonic() + 10  # eviction may lag the last watch a little
            while max(groups().values()) > MAX_GROUPS and time.monotonic() < deadline:
                time.sleep(0.5)
            groups_left = groups()
            xinfo_before = xinfo_calls(store)
            cost_after = redis_calls_per_put(store, http)
            commit_after = redis_calls_per_commit(store, http)
            xinfo_on_hot_path = xinfo_calls(store) - xinfo_before
    finally:
        store.close()

    print(
        f"\nRELIABILITY {GROUP_FLOOD} watches in made-up groups: groups left {max(groups_left.values())}; "
        f"Redis commands per put {cost_before:.1f} before, {cost_after:.1f} after; per sink put + commit "
        f"{commit_before:.1f} before, {commit_after:.1f} after; XINFO on those paths: {xinfo_on_hot_path}"
    )
    problems = []
    if max(groups_left.values()) > MAX_GROUPS:
        problems.append(
            f"after {GROUP_FLOOD} watches in made-up groups ({delivered} delivered), the sink has groups "
            f"{groups_left} (bound {MAX_GROUPS} per stream); a put cost {cost_before:.1f} Redis commands "
            f"before, {cost_after:.1f} after"
        )
    if cost_after > cost_before * 1.1 + 1:
        problems.append(f"a put costs {cost_after:.1f} Redis commands after the flood, {cost_before:.1f} before")
    if commit_after > commit_before * 1.1 + 1:
        problems.append(f"a commit costs {commit_after:.1f} Redis commands after the flood, {commit_before:.1f} before")
    if xinfo_on_hot_path:
        problems.append(f"puts and commits ran XINFO {xinfo_on_hot_path} times (a scan of every group)")
    assert not problems, "\n".join(problems)


# --- item 10: idle watches ------------------------------------------------------------------

IDLE_WATCHES = 500
OPEN_CONCURRENCY = 25
MEASURE_SECONDS = 5.0
COMMANDS_PER_SECOND_BOUND = 100
ATTRS_CALLS = 20
ATTRS_P99_BOUND_SECONDS = 2.0
HELD_SECONDS = 15.0


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def test_idle_watches_cost_next_to_nothing_and_stay_open(api: ApiFactory, redis_url: str) -> None:
    service = api()  # no worker: every Redis command in the window is the watches' (and attrs') doing
    store = redis.Redis.from_url(redis_url)
    url = ws_url(service.url, "/api/predict/echo/sink", _watch_="true")

    async def hold() -> tuple[float, list[float], int, list[str]]:
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def open_one(n: int) -> ClientConnection:
            async with gate:
                return await connect(
                    url, additional_headers={UID_HEADER: f"idle-{n}"}, open_timeout=60, ping_interval=None
                )

        watches = await asyncio.gather(*(open_one(n) for n in range(IDLE_WATCHES)))
        all_open = time.monotonic()
        try:
            await asyncio.sleep(1)  # let each watch reach its idle wait
            before = commands_executed(store)
            await asyncio.sleep(MEASURE_SECONDS)
            rate = (commands_executed(store) - before) / MEASURE_SECONDS
            latencies = []
            async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
                for _ in range(ATTRS_CALLS):
                    started = time.monotonic()
                    answer = await http.get("/api/predict/echo/sink", params={"_attrs_": "true"})
                    latencies.append(time.monotonic() - started)
                    assert answer.status_code == 200, answer.text
            await asyncio.sleep(max(0.0, all_open + HELD_SECONDS - time.monotonic()))
            still_open = sum(ws.state is State.OPEN for ws in watches)
            closes = [f"{ws.close_code} {ws.close_reason!r}" for ws in watches if ws.state is not State.OPEN]
            return rate, latencies, still_open, closes
        finally:
            await asyncio.gather(*(asyncio.wait_for(ws.close(), 10) for ws in watches), return_exceptions=True)

    try:
        rate, latencies, still_open, closes = asyncio.run(hold())
    finally:
        store.close()

    print(
        f"\nRELIABILITY {IDLE_WATCHES} idle watches: Redis {rate:.1f} commands/s; attributes p99 "
        f"{p99(latencies) * 1000:.0f} ms; {still_open} still open after {HELD_SECONDS:g} s"
    )
    problems = []
    if rate >= COMMANDS_PER_SECOND_BOUND:
        problems.append(f"{IDLE_WATCHES} idle watches make Redis run {rate:.0f} commands/s")
    if p99(latencies) > ATTRS_P99_BOUND_SECONDS:
        problems.append(f"attributes p99 {p99(latencies):.2f} s over {ATTRS_CALLS} calls (max {max(latencies):.2f} s)")
    if still_open != IDLE_WATCHES:
        problems.append(
            f"{IDLE_WATCHES - still_open} of {IDLE_WATCHES} idle watches were closed within {HELD_SECONDS:g} s "
            f"(e.g. {sorted(set(closes))[:3]})"
        )
    assert not problems, "\n".join(problems)
