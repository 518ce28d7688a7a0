"""`queue-service up`: one command runs redis-server, the API and an rq worker; Ctrl-C stops them all."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from queue_service.embedded_redis import RedisServer, free_port
from tests.conftest import ServicesFileFactory
from tests.integration.conftest import REQUEST_ID, SLEEP, wait_until

pytestmark = pytest.mark.integration

QUEUE_SERVICE = str(Path(sys.executable).parent / "queue-service")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: the fields after it are fixed.
    return stat.rsplit(")", 1)[1].split()


def is_running(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _all_stats() -> dict[int, list[str]]:
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            stats[int(entry.name)] = fields
    return stats


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its command line (read from /proc)."""
    parents = {child: int(fields[1]) for child, fields in _all_stats().items()}
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found[child] = _cmdline(child)
                frontier.append(child)
    return found


def session_members(session: int) -> dict[int, str]:
    """Live processes of a session (`up` runs in one of its own), with their command lines."""
    return {
        pid: _cmdline(pid) for pid, fields in _all_stats().items() if int(fields[3]) == session and fields[0] != "Z"
    }


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    url: str
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_ready(self) -> None:
        def ready() -> bool:
            try:
                answer = httpx.get(f"{self.url}/readyz", timeout=1)
            except httpx.HTTPError:
                return False
            return answer.status_code == 200 and not answer.json()["services_without_workers"]

        wait_until(ready, 30, f"ready; log:\n{self.log()}", interval=0.1)

    def wait_for_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`up` still running after {timeout:g} s; log:\n{self.log()}") from None

    def left_running(self) -> list[str]:
        """What `up` left behind after it exited: processes of its session, an embedded Redis still listening."""
        left = list(session_members(self.process.pid).values())
        embedded = re.search(r"redis-server \(embedded\) on redis://127\.0\.0\.1:(\d+)", self.log())
        if embedded and listening(int(embedded.group(1))):
            left.append(f"embedded redis-server on port {embedded.group(1)}")
        return left

    def ctrl_c(self) -> float:
        """Signal the whole process group, as a terminal does; return how long `up` took to exit."""
        started = time.monotonic()
        os.killpg(self.process.pid, signal.SIGINT)
        self.process.wait(timeout=40)
        return time.monotonic() - started


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    """`up(*args)` runs `queue-service up --port P --workers 1 *args` in a session of its own, from tmp_path.

    `workers=None` leaves the worker count to the services file; `env` adds settings (QS_UP_*).
    """
    started: list[Up] = []

    def start(*args: str, workers: int | None = 1, port: int | None = None, env: dict[str, str] | None = None) -> Up:
        port = port or free_port()
        log_path = tmp_path / f"up-{port}.log"
        # No QS_* settings from the developer's shell: `up` must start its own embedded Redis.
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("QS_")} | (env or {})
        count = ["--workers", str(workers)] if workers is not None else []
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [QUEUE_SERVICE, "up", "--port", str(port), *count, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=tmp_path,
                start_new_session=True,
            )
        started.append(Up(process, f"http://127.0.0.1:{port}", port, log_path))
        return started[-1]

    yield start
    for each in started:
        family = descendants(each.process.pid) | session_members(each.process.pid)
        if each.process.poll() is None:
            os.killpg(each.process.pid, signal.SIGKILL)
            each.process.wait()
        for pid in family:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)


def test_up_serves_the_curl_flow_and_ctrl_c_stops_every_process_it_started(up: Callable[..., Up]) -> None:
    service = up()
    service.wait_until_ready()
    with httpx.Client(base_url=service.url, timeout=10) as http:
        put = http.post("/api/predict/echo", content=b"hello")
        assert put.status_code == 200 and put.text.isdigit()
        got = http.get(
            "/api/predict/echo/sink",
            params={"requestId": put.headers[REQUEST_ID], "_raw_": "true", "_timeout_": "4s"},
        )
        assert got.content == b"hello"

    log = service.log_path.read_text()
    assert "has no token" in log, "the open built-in service is announced"
    embedded = re.search(r"redis-server \(embedded\) on redis://127\.0\.0\.1:(\d+)", log)
    assert embedded and int(embedded.group(1)) != 6379
    family = descendants(service.process.pid)
    kinds = {
        kind: [pid for pid, command in family.items() if needle in command]
        for kind, needle in (
            ("redis-server", "redis-server"),
            ("api", "queue_service.serve"),
            ("rq worker", "rq.cli worker"),
        )
    }
    assert all(len(pids) == 1 for pids in kinds.values()), f"{kinds} in {family}"

    stopped_after = service.ctrl_c()
    print(f"Ctrl-C stopped everything in {stopped_after:.2f} s")
    assert service.process.returncode == 0
    assert not [pid for pid in family if is_running(pid)], f"still running after Ctrl-C: {family}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{service.url}/healthz", timeout=1)


def test_ctrl_c_while_a_worker_holds_an_item_stops_everything_promptly(
    up: Callable[..., Up], services_file: ServicesFileFactory
) -> None:
    # Ctrl-C reaches the embedded redis-server as well: the worker cannot hand in its result, and
    # `up` must not wait its whole 30 s grace for it.
    service = up("--services", str(services_file([{"name": "sleep", "processor": SLEEP}])))
    service.wait_until_ready()
    assert httpx.post(f"{service.url}/api/predict/sleep", content=b"3").status_code == 200
    time.sleep(0.5)  # the worker is now sleeping on it
    family = descendants(service.process.pid)
    stopped_after = service.ctrl_c()
    assert stopped_after < 6, f"Ctrl-C took {stopped_after:.1f} s"
    assert not [pid for pid in family if is_running(pid)], f"still running after Ctrl-C: {family}"


# --- careless starts: refused before anything runs ------------------------------------------------

TOKEN = "up-test-token"  # services with a token: `up` prints no warning, so a refusal is its only line


def error_lines(up: Up) -> list[str]:
    return [line for line in up.log().splitlines() if line.strip()]


def assert_refused_in_one_line(up: Up, *expected: str) -> str:
    code = up.wait_for_exit(timeout=30)
    lines = error_lines(up)
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    for text in expected:
        assert text in lines[0], lines[0]
    assert not up.left_running(), up.left_running()
    return lines[0]


def test_a_typo_in_a_processor_is_refused_at_once_naming_the_service(
    up: Callable[..., Up], services_file: ServicesFileFactory
) -> None:
    path = services_file([{"name": "echo", "processor": "workers.examples:Ecko", "token": TOKEN}])
    started = time.monotonic()
    line = assert_refused_in_one_line(up("--services", str(path)), "service 'echo'", "Ecko", "workers.examples:Echo")
    print(f"refused in {time.monotonic() - started:.2f} s: {line}")


def test_a_processor_whose_import_fails_is_refused_with_the_reason(
    up: Callable[..., Up], services_file: ServicesFileFactory, tmp_path: Path
) -> None:
    # As LanguageId's module would be if it imported langid at the top, in a venv without the extra.
    (tmp_path / "needs_langid.py").write_text(
        "raise ImportError(\"LanguageId needs the langid package: pip install 'queue-service[examples]'\")\n"
    )
    path = services_file(
        [
            {"name": "echo", "processor": "workers.examples:Echo", "token": TOKEN},
            {"name": "language-id", "processor": "needs_langid:LanguageId", "token": TOKEN},
        ]
    )
    assert_refused_in_one_line(
        up("--services", str(path)), "service 'language-id'", "pip install 'queue-service[examples]'"
    )


def test_an_unreachable_redis_url_is_refused_in_one_line(
    up: Callable[..., Up], services_file: ServicesFileFactory
) -> None:
    nothing_there = f"redis://127.0.0.1:{free_port()}/0"
    path = services_file([{"name": "echo", "processor": "workers.examples:Echo", "token": TOKEN}])
    service = up("--services", str(path), "--redis-url", nothing_there)
    assert_refused_in_one_line(service, f"cannot reach Redis at {nothing_there}")
    assert service.process.returncode == 1


def test_a_port_in_use_is_refused_before_any_process_starts(
    up: Callable[..., Up], services_file: ServicesFileFactory
) -> None:
    path = services_file([{"name": "echo", "processor": "workers.examples:Echo", "token": TOKEN}])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = up("--services", str(path), port=port)
        line = assert_refused_in_one_line(service, f"port {port}", "already in use")
    assert service.process.returncode == 1
    assert "redis-server" not in line and "worker" not in service.log()


# --- supervision ----------------------------------------------------------------------------------

BROKEN_INIT = """
class Broken:
    def initialize(self):
        raise RuntimeError("model weights not found at /models/broken.bin")

    def process(self, data):
        return data
"""


def test_a_worker_failing_at_start_is_retried_with_backoff_then_up_gives_up(
    up: Callable[..., Up], services_file: ServicesFileFactory, tmp_path: Path
) -> None:
    (tmp_path / "broken_init.py").write_text(BROKEN_INIT)
    path = services_file(
        [
            {"name": "echo", "processor": "workers.examples:Echo", "token": TOKEN},
            {"name": "broken", "processor": "broken_init:Broken", "token": TOKEN},
        ]
    )
    service = up("--services", str(path), env={"QS_UP_START_ATTEMPTS": "3", "QS_UP_BACKOFF_SECONDS": "0.2"})
    code = service.wait_for_exit(timeout=120)
    log = service.log()
    assert code == 1, log
    last = error_lines(service)[-1]
    # 78: the worker's own "this processor cannot start" (sysexits EX_CONFIG), after its one-line reason.
    assert last.startswith("Error: service 'broken': its worker exited with code 78"), last
    assert "3 times in a row" in last
    assert "model weights not found" in log  # the worker's own error is on the terminal
    restarts = re.findall(r"broken: worker \d+ exited with code 78; restarting in ([\d.]+) s", log)
    assert restarts == ["0.2", "0.4"], restarts  # the wait doubles
    assert "echo: worker" not in log  # the healthy service's worker was never restarted
    assert not service.left_running(), service.left_running()


def test_a_worker_that_dies_after_running_fine_is_restarted_at_once(up: Callable[..., Up]) -> None:
    # Every exit counts as "after running fine" with a quick-exit window of 0 s.
    service = up(env={"QS_UP_QUICK_EXIT_SECONDS": "0", "QS_UP_START_ATTEMPTS": "1"})
    service.wait_until_ready()
    [first] = [pid for pid, command in descendants(service.process.pid).items() if "rq.cli worker" in command]
    os.kill(first, signal.SIGKILL)

    def replaced() -> int | None:
        workers = [pid for pid, cmd in descendants(service.process.pid).items() if "rq.cli worker" in cmd]
        return workers[0] if workers and workers[0] != first else None

    wait_until(replaced, 30, f"a new worker; log:\n{service.log()}")
    assert re.search(rf"echo: worker {first} was killed by SIGKILL; restarting in 0 s", service.log())
    got = httpx.post(f"{service.url}/api/predict/echo/sync", content=b"again", timeout=30)
    assert got.status_code == 200 and got.content == b"again"
    assert service.process.poll() is None


def test_the_api_dying_stops_everything_and_up_exits_non_zero(up: Callable[..., Up]) -> None:
    service = up()
    service.wait_until_ready()
    [api] = [pid for pid, command in descendants(service.process.pid).items() if "queue_service.serve" in command]
    os.kill(api, signal.SIGKILL)
    assert service.wait_for_exit(timeout=40) == 1
    assert "Error: the API was killed by SIGKILL" in service.log()
    assert not service.left_running(), service.left_running()


# --- one service per worker process ----------------------------------------------------------------

SLOW_INIT = """
import time


class Slow:
    def initialize(self):
        time.sleep(60)  # a large model loading

    def process(self, data):
        return data
"""


def test_a_slow_model_does_not_keep_other_services_waiting(
    up: Callable[..., Up], services_file: ServicesFileFactory, tmp_path: Path
) -> None:
    (tmp_path / "slow_init.py").write_text(SLOW_INIT)
    path = services_file(
        [
            {"name": "echo", "processor": "workers.examples:Echo", "metadata": {"rpc": {"worker_threads": 2}}},
            {"name": "slow", "processor": "slow_init:Slow", "metadata": {"rpc": {"worker_threads": 1}}},
        ]
    )
    started = time.monotonic()
    service = up("--services", str(path), workers=None)

    def echoed() -> bool:
        try:
            answer = httpx.post(f"{service.url}/api/predict/echo/sync", content=b"hi", timeout=5)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and answer.content == b"hi"

    # Before, every worker loaded every processor: echo waited the whole 60 s of the slow model.
    wait_until(echoed, 30, f"echo answering; log:\n{service.log()}", interval=0.2)
    print(f"echo answered {time.monotonic() - started:.1f} s after `up` started")
    log = service.log()
    assert "echo: 2 workers" in log and "slow: 1 worker" in log
    workers = [cmd.split() for cmd in descendants(service.process.pid).values() if "rq.cli worker" in cmd]
    assert sorted(argv[-1] for argv in workers) == ["echo", "echo", "slow"], workers
    readiness = httpx.get(f"{service.url}/readyz", timeout=5).json()
    assert readiness["services_without_workers"] == ["slow"]


def test_up_on_an_existing_redis_runs_the_given_workers_per_service(
    up: Callable[..., Up], services_file: ServicesFileFactory, redis_server: RedisServer
) -> None:
    # As the shared benchmark harness starts it: its own Redis, `--workers 2`, one service.
    path = services_file([{"name": "echo", "processor": "workers.examples:Echo", "token": TOKEN}])
    service = up("--services", str(path), "--redis-url", redis_server.url, workers=2)
    service.wait_until_ready()

    def live_workers() -> bool:
        attributes = httpx.get(
            f"{service.url}/api/predict/echo", params={"_attrs_": "true"}, headers={"Authorization": TOKEN}, timeout=5
        ).json()
        return attributes["workers.live"] == "2"

    wait_until(live_workers, 30, f"2 live workers; log:\n{service.log()}")
    assert "embedded" not in service.log()
    assert service.ctrl_c() < 40 and service.process.returncode == 0
    assert not service.left_running(), service.left_running()
    assert redis_server.is_running()  # not ours to stop


ASYNC_MODEL = """
import asyncio

class Waits:
    async def process(self, data):
        await asyncio.sleep(0.01)
        return data
"""


def test_up_starts_one_process_holding_worker_threads_requests_for_an_async_processor(
    up: Callable[..., Up], services_file: ServicesFileFactory, tmp_path: Path
) -> None:
    (tmp_path / "async_model.py").write_text(ASYNC_MODEL)
    path = services_file(
        [
            {"name": "echo", "processor": "workers.examples:Echo", "metadata": {"rpc": {"worker_threads": 3}}},
            {"name": "waits", "processor": "async_model:Waits", "metadata": {"rpc": {"worker_threads": 8}}},
        ]
    )
    service = up("--services", str(path), workers=None)
    service.wait_until_ready()
    log = service.log()
    # A sync processor: one process per request; an async one: one process holding all 8.
    assert "echo: 3 workers" in log and "waits: 1 worker" in log
    workers = [cmd.split() for cmd in descendants(service.process.pid).values() if "rq.cli worker" in cmd]
    assert sorted(argv[-1] for argv in workers) == ["echo", "echo", "echo", "waits"], workers
    wait_until(lambda: "waits runs up to 8 requests at once" in service.log(), 10, "the worker saying so")
    answer = httpx.post(f"{service.url}/api/predict/waits/sync", content=b"hi", timeout=10)
    assert (answer.status_code, answer.content) == (200, b"hi")


def test_batching_for_a_processor_that_takes_no_batches_is_refused_naming_the_key(
    up: Callable[..., Up], services_file: ServicesFileFactory
) -> None:
    path = services_file(
        [
            {
                "name": "echo",
                "processor": "workers.examples:Echo",
                "token": TOKEN,
                "metadata": {"rpc": {"batching": True}},
            }
        ]
    )
    assert_refused_in_one_line(up("--services", str(path)), "service 'echo'", "metadata.rpc.batching", "process_batch")
