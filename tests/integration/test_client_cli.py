"""The `queue-service` client commands, run as a person or a script runs them: a subprocess against a
real API and rq worker, checking what they print and the exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from queue_service.embedded_redis import RedisServer, free_port
from queue_service.testing import ManagedProcess, start_api, start_worker
from tests.conftest import ServicesFileFactory
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "queue-service")
TOKEN = "cli-test-token"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_NO_CONNECTION = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
CLIENT_COMMANDS = ("put", "get", "watch", "attrs", "health")


@dataclass
class Stack:
    redis: RedisServer
    services_file: Path
    api: ManagedProcess
    url: str
    workers: list[ManagedProcess]

    def add_worker(self) -> None:
        """Start a worker; return once the API counts it as live for every service."""
        self.workers.append(start_worker(self.redis.url, self.services_file))
        deadline = time.monotonic() + 20
        while httpx.get(f"{self.url}/readyz", timeout=5).json()["services_without_workers"]:
            assert time.monotonic() < deadline, f"worker not live; log:\n{self.workers[-1].log_tail()}"
            time.sleep(0.05)


@pytest.fixture
def api_only(redis_server: RedisServer, services_file: ServicesFileFactory) -> Iterator[Stack]:
    path = services_file(
        [
            {"name": "echo", "processor": "workers.examples:Echo", "token": TOKEN},
            {"name": "sleep", "processor": "workers.examples:Sleep", "token": TOKEN},
        ]
    )
    api, url = start_api(redis_server.url, path)
    stack = Stack(redis_server, path, api, url, [])
    try:
        yield stack
    finally:
        for process in [*stack.workers, api]:
            process.stop()


@pytest.fixture
def stack(api_only: Stack) -> Stack:
    api_only.add_worker()
    return api_only


def cli_env(**extra: str) -> dict[str, str]:
    # The developer's own QS_* settings must not leak into what is tested.
    return {**{k: v for k, v in os.environ.items() if not k.startswith("QS_")}, **extra}


def run_cli(*args: str, url: str | None = None, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess:
    env = cli_env(QS_TOKEN=TOKEN, **({"QS_URL": url} if url else {}))
    return subprocess.run([CLI, *args], input=stdin, capture_output=True, env=env, timeout=timeout, check=False)


def put_and_get_id(stack: Stack, service: str, body: bytes) -> tuple[int, str]:
    done = run_cli("put", "--service", service, url=stack.url, stdin=body)
    assert done.returncode == EXIT_OK, done.stderr
    index, request_id = done.stdout.decode().strip().split("\t")
    return int(index), request_id


def wait_until_running(stack: Stack, service: str, index: int) -> None:
    deadline = time.monotonic() + 20
    params = {"_search_": "true", "_index_": str(index)}
    while time.monotonic() < deadline:
        answer = httpx.get(f"{stack.url}/api/predict/{service}", params=params, headers={"Authorization": TOKEN})
        if answer.status_code == 200 and answer.json()["IsPending"]:
            return
        time.sleep(0.05)
    raise AssertionError(f"{service} #{index} never started")


# --- put and get -----------------------------------------------------------------------------


def test_put_wait_prints_the_echo_and_nothing_else_when_not_a_terminal(stack: Stack) -> None:
    done = run_cli("put", "-s", "echo", "--wait", "--url", stack.url, stdin=b"hello")
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout == b"hello\n"
    assert done.stderr == b""


def test_put_a_file_then_get_its_result_by_request_id(stack: Stack, tmp_path: Path) -> None:
    body = bytes(range(256))  # not text: --raw must give back the exact bytes
    path = tmp_path / "body.bin"
    path.write_bytes(body)
    done = run_cli("put", "-s", "echo", "--tag", "origin=test", str(path), url=stack.url)
    assert done.returncode == EXIT_OK, done.stderr
    index, request_id = done.stdout.decode().strip().split("\t")
    assert int(index) >= 1

    kept = run_cli("get", "-s", "echo", "--timeout", "20", "--raw", "--keep", request_id, url=stack.url)
    assert kept.returncode == EXIT_OK, kept.stderr
    assert kept.stdout == body
    read = run_cli("get", "-s", "echo", "--raw", request_id, url=stack.url)
    assert read.stdout == body
    # Reading without --keep removed it: now there is nothing to get, and the CLI says so (not "it may come").
    gone = run_cli("get", "-s", "echo", request_id, url=stack.url)
    assert gone.returncode == EXIT_REFUSED
    assert request_id in gone.stderr.decode()
    assert "already read" in gone.stderr.decode()
    unknown = run_cli("get", "-s", "echo", "no-such-request", url=stack.url)
    assert unknown.returncode == EXIT_REFUSED
    assert "unknown" in unknown.stderr.decode()


class Terminal:
    """A pseudo-terminal for a CLI's stderr, as a person sees it; everything written to it is kept."""

    def __init__(self) -> None:
        self.reader_fd, self.fd = pty.openpty()
        self.seen = bytearray()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.reader_fd, 1024)
            except OSError:  # the CLI exited and closed the terminal
                return
            if not chunk:
                return
            self.seen.extend(chunk)

    def text(self) -> str:
        return self.seen.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (found := re.search(pattern, self.text())) is None:
            assert time.monotonic() < deadline, f"{pattern!r} not shown within {timeout:g} s: {self.text()!r}"
            time.sleep(0.05)
        return found

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        """The CLI with this terminal as its stderr (stdin and stdout are pipes)."""
        process = subprocess.Popen(
            [CLI, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.fd, env=cli_env(QS_TOKEN=TOKEN)
        )
        os.close(self.fd)  # the child holds it now: the reader sees the end when the child exits
        return process

    def close(self) -> None:
        self._thread.join(timeout=5)
        os.close(self.reader_fd)


def test_put_wait_shows_queue_position_then_running_then_done_on_a_terminal(api_only: Stack, tmp_path: Path) -> None:
    # No worker yet: one sleep waits, ours waits behind it until the CLI has shown so.
    put_and_get_id(api_only, "sleep", b"0.5")
    body = tmp_path / "seconds.txt"
    body.write_bytes(b"1.5")
    terminal = Terminal()
    with terminal.spawn("put", "-s", "sleep", "--wait", "--url", api_only.url, str(body)) as process:
        terminal.wait_for(r"1 ahead in queue")
        api_only.add_worker()  # now the one ahead runs, then ours
        stdout, _ = process.communicate(timeout=60)
    terminal.close()
    assert process.returncode == EXIT_OK, terminal.text()
    assert json.loads(stdout) == {"slept": 1.5}
    shown = terminal.text()
    assert "accepted: index" in shown
    assert "1 ahead in queue" in shown
    assert "running" in shown
    assert "done in" in shown
    assert shown.index("accepted") < shown.index("ahead in queue") < shown.index("running (") < shown.index("done in")


def test_ctrl_c_during_put_wait_keeps_the_request_id_and_says_how_to_get_the_result(stack: Stack) -> None:
    terminal = Terminal()
    with terminal.spawn("put", "-s", "sleep", "--wait", "--url", stack.url) as process:
        assert process.stdin is not None
        # 8 s: the Ctrl-C must land while the request runs, even when this test's thread is slow to see the id.
        process.stdin.write(b"8")
        process.stdin.close()
        # The id is on the terminal as soon as the put is accepted, long before any result.
        accepted = terminal.wait_for(r"accepted: index (\d+), request id ([0-9a-f-]+)")
        request_id = accepted.group(2)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    terminal.close()
    shown = terminal.text()
    assert code == EXIT_INTERRUPTED, shown
    assert "Traceback" not in shown
    command = re.search(r"queue-service get (.+)", shown)
    assert command and "-s sleep" in command.group(1) and request_id in command.group(1), shown
    # The command printed works: the request went on, and its result is there to get.
    later = run_cli("get", "--timeout", "60", *shlex.split(command.group(1).strip()))
    assert later.returncode == EXIT_OK, later.stderr
    assert json.loads(later.stdout) == {"slept": 8}


def test_put_wait_without_a_live_worker_says_so_once_and_keeps_waiting(api_only: Stack, tmp_path: Path) -> None:
    stderr_path = tmp_path / "put.stderr"
    with (
        open(stderr_path, "wb") as stderr,
        subprocess.Popen(
            [CLI, "put", "-s", "echo", "--wait", "--url", api_only.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=cli_env(QS_TOKEN=TOKEN),
        ) as process,
    ):
        assert process.stdin is not None
        process.stdin.write(b"hello")
        process.stdin.close()
        wait_until(lambda: b"no live worker" in stderr_path.read_bytes(), 30, "told there is no live worker")
        assert process.poll() is None  # still waiting: an async put waits for a worker
        api_only.add_worker()
        assert process.stdout is not None
        stdout = process.stdout.read()
        process.wait(timeout=60)
    assert process.returncode == EXIT_OK, stderr_path.read_text()
    assert stdout == b"hello\n"
    told = stderr_path.read_text()
    assert told.count("no live worker") == 1 and "echo" in told, told


def test_a_processor_error_is_printed_and_exits_1(stack: Stack) -> None:
    done = run_cli("put", "-s", "sleep", "--wait", url=stack.url, stdin=b"not a number")
    assert done.returncode == EXIT_REFUSED
    assert b"Sleep expects" in done.stdout
    assert b"status 400" in done.stderr


def test_waiting_longer_than_the_timeout_exits_3(stack: Stack) -> None:
    started = time.monotonic()
    done = run_cli("put", "-s", "sleep", "--wait", "--timeout", "1", url=stack.url, stdin=b"20")
    assert done.returncode == EXIT_TIMEOUT, done.stderr
    # At its 1 s timeout (~1.4 s with the CLI's start on a quiet machine), long before the job ends.
    assert time.monotonic() - started < 10
    assert b"queue-service get" in done.stderr  # says how to fetch the result later
    _, request_id = put_and_get_id(stack, "sleep", b"4")
    assert run_cli("get", "-s", "sleep", "--timeout", "0.5", request_id, url=stack.url).returncode == EXIT_TIMEOUT


# --- watch and attrs ----------------------------------------------------------------------


def test_watch_prints_results_as_they_come_and_commits_them(stack: Stack) -> None:
    _, first_id = put_and_get_id(stack, "echo", b"first")
    _, second_id = put_and_get_id(stack, "echo", b"second")
    done = run_cli("watch", "-s", "echo", "--count", "2", url=stack.url, timeout=30)
    assert done.returncode == EXIT_OK, done.stderr
    items = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert {item["data"] for item in items} == {"first", "second"}
    assert {item["tags"]["requestId"] for item in items} == {first_id, second_id}
    attributes = json.loads(run_cli("attrs", "-s", "echo", "--sink", url=stack.url).stdout)
    assert attributes["stream.length"] == "0"  # committed: gone from the sink


def test_attrs_prints_the_queue_attributes_as_json(stack: Stack) -> None:
    done = run_cli("attrs", "-s", "echo", url=stack.url)
    assert done.returncode == EXIT_OK, done.stderr
    attributes = json.loads(done.stdout)
    assert attributes["meta.name"] == "echo"
    assert attributes["workers.live"] == "1"


# --- health -------------------------------------------------------------------------------


def test_health_is_ready_only_when_every_service_can_serve_and_names_those_that_cannot(api_only: Stack) -> None:
    without = run_cli("health", url=api_only.url)
    assert without.returncode == EXIT_REFUSED, without.stdout
    assert b"echo: cannot serve: no live worker" in without.stdout
    assert b"sleep: cannot serve: no live worker" in without.stdout
    # The API itself takes requests (async puts wait for a worker): what a load balancer asks.
    assert run_cli("health", "--api-only", url=api_only.url).returncode == EXIT_OK

    api_only.add_worker()
    done = run_cli("health", url=api_only.url)
    assert done.returncode == EXIT_OK, done.stdout
    assert done.stdout == b"ready: Redis ok, every service can serve\n"

    api_only.redis.stop()
    down = run_cli("health", url=api_only.url)
    assert down.returncode == EXIT_REFUSED
    assert b"not ready" in down.stderr


# --- failures a script can tell apart -----------------------------------------------------


def test_a_closed_port_exits_4_for_every_command() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (
        ("put", "-s", "echo"),
        ("put", "-s", "echo", "--wait"),
        ("get", "-s", "echo", "some-request-id"),
        ("watch", "-s", "echo"),
        ("attrs", "-s", "echo"),
        ("health",),
    ):
        done = run_cli(*args, url=url, stdin=b"x", timeout=30)
        assert done.returncode == EXIT_NO_CONNECTION, (args, done.stderr)
        assert b"cannot connect" in done.stderr


def test_a_refused_request_exits_1(api_only: Stack) -> None:
    wrong_token = subprocess.run(
        [CLI, "put", "-s", "echo", "--url", api_only.url, "--token", "wrong"],
        input=b"x",
        capture_output=True,
        env=cli_env(),
        timeout=30,
        check=False,
    )
    assert wrong_token.returncode == EXIT_REFUSED
    assert b"401" in wrong_token.stderr
    unknown = run_cli("attrs", "-s", "no-such-service", url=api_only.url)
    assert unknown.returncode == EXIT_REFUSED
    assert b"404" in unknown.stderr


def test_usage_errors_exit_2() -> None:
    for args in (
        ("put", "-s", "echo", "--tag", "no-equals-sign"),
        ("put", "-s", "echo", "--tag", "_priority_=1"),
        ("put", "-s", "echo", "--timeout", "5"),  # --timeout needs --wait
        ("get", "some-request-id"),  # no --service
        ("health", "--url", "127.0.0.1:8000"),  # no scheme
    ):
        assert run_cli(*args, stdin=b"x").returncode == EXIT_USAGE, args


def test_every_command_documents_its_exit_codes_with_an_example() -> None:
    for command in CLIENT_COMMANDS:
        done = run_cli(command, "--help")
        assert done.returncode == EXIT_OK
        text = done.stdout.decode()
        assert "Exit codes:" in text and "4  cannot connect" in text, command
        assert f"queue-service {command}" in text.split("Examples:")[1], command
