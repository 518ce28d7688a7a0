"""`queue-service up`: one command runs redis-server, the API and an rq worker; Ctrl-C stops them all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from queue_service.embedded_redis import free_port
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


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its command line (read from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            parents[int(entry.name)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    found[child] = ""
                frontier.append(child)
    return found


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def wait_until_ready(self) -> None:
        def ready() -> bool:
            try:
                answer = httpx.get(f"{self.url}/readyz", timeout=1)
            except httpx.HTTPError:
                return False
            return answer.status_code == 200 and not answer.json()["services_without_workers"]

        wait_until(ready, 30, f"ready; log:\n{self.log_path.read_text()}", interval=0.1)

    def ctrl_c(self) -> float:
        """Signal the whole process group, as a terminal does; return how long `up` took to exit."""
        started = time.monotonic()
        os.killpg(self.process.pid, signal.SIGINT)
        self.process.wait(timeout=40)
        return time.monotonic() - started


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    """`up(*args)` runs `queue-service up --port P --workers 1 *args` in a process group of its own."""
    started: list[Up] = []

    def start(*args: str) -> Up:
        port = free_port()
        log_path = tmp_path / f"up-{port}.log"
        # No QS_* settings from the developer's shell: `up` must start its own embedded Redis.
        env = {k: v for k, v in os.environ.items() if not k.startswith("QS_")}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [QUEUE_SERVICE, "up", "--port", str(port), "--workers", "1", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
                start_new_session=True,
            )
        started.append(Up(process, f"http://127.0.0.1:{port}", log_path))
        return started[-1]

    yield start
    for each in started:
        family = descendants(each.process.pid)
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
        for kind, needle in (("redis-server", "redis-server"), ("uvicorn", "uvicorn"), ("rq worker", "rq.cli worker"))
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
