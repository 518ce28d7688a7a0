"""The benchmark's real processes: uvicorn (the API, the hello-world ceiling), our rq workers, plain rq workers.

Each runs as a child with its output in a log file under one directory; the start functions return once
the process is ready and stop it before raising. Same idea as tests/support/processes.py, which bench
code does not import.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import httpx
import redis
from rq.worker import Worker
from rq.worker_registration import REDIS_WORKER_KEYS

from queue_service.embedded_redis import free_port
from queue_service.store import keys

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_SECONDS = 30.0


class ProcessStartError(RuntimeError):
    """A process exited or was not ready in time; the message carries the tail of its log."""


class Child:
    """A child process with stdout and stderr in `log_dir/name.log`; stopped at interpreter exit."""

    def __init__(self, argv: Sequence[str], name: str, log_dir: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                cwd=REPO_ROOT,
            )
        atexit.register(self.stop, 1.0)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.running():
            self.popen.terminate()
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        atexit.unregister(self.stop)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_until(child: Child, ready: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.running():
            raise ProcessStartError(f"{child.name} exited before {what}; log tail:\n{child.log_tail()}")
        if ready():
            return
        time.sleep(0.05)
    child.stop()
    raise ProcessStartError(f"{child.name}: not {what} within {timeout:g} s; log tail:\n{child.log_tail()}")


def product_env(redis_url: str, services_file: Path) -> dict[str, str]:
    return {"QS_REDIS_URL": redis_url, "QS_SERVICES": str(services_file)}


def spawn_uvicorn(app: str, name: str, log_dir: Path, env: Mapping[str, str]) -> tuple[Child, str]:
    """`python -m uvicorn APP --factory` on 127.0.0.1 with uvicorn's defaults (one process); not yet waited for."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", app, "--factory", "--host", "127.0.0.1", "--port", str(port)]
    return Child(argv, name, log_dir, env), f"http://127.0.0.1:{port}"


def wait_http(child: Child, url: str, method: str = "GET") -> None:
    def answers() -> bool:
        try:
            return httpx.request(method, url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    wait_until(child, answers, f"answering {method} {url}")


def spawn_rq_worker(
    redis_url: str, queues: Sequence[str], name: str, log_dir: Path, worker_class: str, env: Mapping[str, str]
) -> Child:
    argv = [sys.executable, "-m", "rq.cli", "worker", "-w", worker_class, "--url", redis_url, "--name", name, *queues]
    return Child(argv, name, log_dir, env)


def wait_registered(children: Iterable[Child], redis_url: str, live_in: str | None = None) -> None:
    """Wait until each worker is in rq's registry and, for ours (`live_in` = service), counted live."""
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        for child in children:

            def ready(child: Child = child) -> bool:
                if not client.sismember(REDIS_WORKER_KEYS, Worker.redis_worker_namespace_prefix + child.name):
                    return False
                if live_in is None:
                    return True
                score = client.zscore(keys.live_workers(live_in), child.name)
                return score is not None and score > time.time()

            wait_until(child, ready, "registered and live")
    finally:
        client.close()


def stop_all(children: Iterable[Child]) -> None:
    children = list(children)
    for child in children:
        if child.running():
            child.popen.terminate()
    for child in children:
        child.stop()
