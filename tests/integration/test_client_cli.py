"""The `queue-service` client commands, run as a person or a script runs them: a subprocess against a
real API and rq worker, checking what they print and the exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import pty
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
from tests.conftest import ServicesFileFactory
from tests.support.processes import ManagedProcess, start_api, start_worker
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "queue-service")
TOKEN = "cli-test-token"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_NO_CONNECTION = 0, 1, 2, 3, 4
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
    # Reading without --keep removed it: now there is nothing to get.
    gone = run_cli("get", "-s", "echo", request_id, url=stack.url)
    assert gone.returncode == EXIT_TIMEOUT
    assert request_id in gone.stderr.decode()


def test_put_wait_shows_queue_position_then_running_then_done_on_a_terminal(api_only: Stack, tmp_path: Path) -> None:
    # No worker yet: one sleep waits, ours waits behind it until the CLI has shown so.
    put_and_get_id(api_only, "sleep", b"0.5")
    body = tmp_path / "seconds.txt"
    body.write_bytes(b"1.5")
    terminal, terminal_side = pty.openpty()
    seen = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(terminal, 1024)
            except OSError:  # the CLI exited and closed the terminal
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    with subprocess.Popen(
        [CLI, "put", "-s", "sleep", "--wait", "--url", api_only.url, str(body)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal_side,
        env=cli_env(QS_TOKEN=TOKEN),
    ) as process:
        os.close(terminal_side)
        wait_until(lambda: b"1 ahead in queue" in seen, 30, "the position shown")
        api_only.add_worker()  # now the one ahead runs, then ours
        stdout, _ = process.communicate(timeout=60)
    reader.join(timeout=5)
    os.close(terminal)
    assert process.returncode == EXIT_OK, seen.decode(errors="replace")
    assert json.loads(stdout) == {"slept": 1.5}
    shown = seen.decode(errors="replace")
    assert "1 ahead in queue" in shown
    assert "running on" in shown
    assert "done in" in shown
    assert shown.index("ahead in queue") < shown.index("running on") < shown.index("done in")


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


def test_health_is_ready_while_redis_answers_and_names_services_without_workers(api_only: Stack) -> None:
    done = run_cli("health", url=api_only.url)
    assert done.returncode == EXIT_OK, done.stderr
    assert b"no live worker for: echo, sleep" in done.stdout
    assert run_cli("health", "--require-workers", url=api_only.url).returncode == EXIT_REFUSED

    api_only.add_worker()
    done = run_cli("health", url=api_only.url)
    assert done.returncode == EXIT_OK
    assert done.stdout == b"ready: Redis ok\n"
    assert run_cli("health", "--require-workers", url=api_only.url).returncode == EXIT_OK

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
