"""Running queue-service's own processes as children, for tests and benchmarks (ours and yours).

The API under uvicorn and `rq worker` processes, each a child with its stdout and stderr in a log file, so
a failing test can show what the process said. `spawn_*` start one and return at once (a benchmark starts
several, then waits for all); `start_*` return only once it is ready, and stop it before raising.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import redis
import yaml
from rq.worker import Worker
from rq.worker_registration import REDIS_WORKER_KEYS

from queue_service.embedded_redis import free_port
from queue_service.store import connection, keys

API_APP = "queue_service.api:create_app"
WORKER_CLASS = "workers.worker.QueueWorker"
STOP_GRACE_SECONDS = 5.0
# How long a start may take before it counts as failed: ~0.5 s on a quiet machine, 10 s and more seen
# with the suite in parallel beside CPU hogs. Only a broken start waits this long.
START_TIMEOUT_SECONDS = 60.0
# A port free_port() gave can be taken by a parallel test (xdist) before uvicorn binds it: try another.
_PORT_ATTEMPTS = 3


class ProcessStartError(RuntimeError):
    """A process exited or was not ready in time; the message carries the tail of its log."""


class ManagedProcess:
    """A child process whose stdout and stderr go to `log_path`; stopped at exit if still running."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str = "process",
        env: Mapping[str, str] | None = None,
        log_dir: str | Path | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix=f"qs-{name}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{name}.log"
        # Unbuffered, so the log is complete up to the moment a test looks at it.
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd,
            )
        # No orphans after a crashed test run: stop it (and drop a log dir we made) at interpreter exit.
        atexit.register(self._at_exit)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def is_running(self) -> bool:
        return self._popen.poll() is None

    def terminate(self) -> None:
        if self.is_running():
            self._popen.terminate()

    def kill(self) -> None:
        if self.is_running():
            self._popen.kill()

    def wait(self, timeout: float | None = None) -> int:
        return self._popen.wait(timeout)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int:
        """SIGTERM, then SIGKILL if it has not exited after `grace` seconds; returns the exit code."""
        self.terminate()
        try:
            return self.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.wait()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _at_exit(self) -> None:
        self.stop(grace=1)
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else f"exited {self.returncode}"
        return f"ManagedProcess({self.name!r}, pid={self.pid}, {state}, log={str(self.log_path)!r})"


def wait_until_ready(process: ManagedProcess, ready: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `ready` until it is true; if the process exits or time runs out, stop it and raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_running():
            raise ProcessStartError(
                f"{process.name} exited with code {process.returncode} before {what}; log tail:\n{process.log_tail()}"
            )
        if ready():
            return
        time.sleep(0.05)
    process.stop()
    raise ProcessStartError(f"{process.name}: not {what} within {timeout:g} s; log tail:\n{process.log_tail()}")


def _product_env(redis_url: str, services_file: str | Path, env: Mapping[str, str] | None) -> dict[str, str]:
    return {"QS_REDIS_URL": redis_url, "QS_SERVICES": str(services_file), **(env or {})}


def spawn_api(
    redis_url: str,
    services_file: str | Path | None,
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    app: str = API_APP,
    log_dir: str | Path | None = None,
) -> tuple[ManagedProcess, str]:
    """Run an ASGI app factory (the API by default) as `queue-service api` does, on 127.0.0.1; its base URL.

    Not waited for. The API's serving settings (keep-alive, one write per small answer) are queue_service/serve.py's.
    """
    port = port or free_port()
    argv = [sys.executable, "-m", "queue_service.serve", "--host", "127.0.0.1", "--port", str(port), "--app", app]
    product_env = _product_env(redis_url, services_file, env) if services_file is not None else dict(env or {})
    process = ManagedProcess(argv, name=f"api-{port}", env=product_env, log_dir=log_dir)
    return process, f"http://127.0.0.1:{port}"


def wait_answering(
    process: ManagedProcess, url: str, method: str = "GET", timeout: float = START_TIMEOUT_SECONDS
) -> None:
    """Wait until `method url` answers with a status below 500."""

    def answers() -> bool:
        try:
            return httpx.request(method, url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    wait_until_ready(process, answers, timeout, f"answering {method} {url}")


def start_api(
    redis_url: str,
    services_file: str | Path,
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT_SECONDS,
    app: str = API_APP,
    log_dir: str | Path | None = None,
) -> tuple[ManagedProcess, str]:
    """Run the API under uvicorn on 127.0.0.1; return it and its base URL once /healthz answers."""
    if port is None:
        for _ in range(_PORT_ATTEMPTS - 1):
            try:
                return start_api(
                    redis_url, services_file, port=free_port(), env=env, timeout=timeout, app=app, log_dir=log_dir
                )
            except ProcessStartError as exc:
                if "address already in use" not in str(exc).lower():
                    raise
        port = free_port()
    process, base_url = spawn_api(redis_url, services_file, port=port, env=env, app=app, log_dir=log_dir)
    wait_answering(process, f"{base_url}/healthz", timeout=timeout)
    return process, base_url


def spawn_worker(
    redis_url: str,
    services_file: str | Path,
    services: Sequence[str] = (),
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    worker_class: str = WORKER_CLASS,
    log_dir: str | Path | None = None,
) -> ManagedProcess:
    """Run `rq worker -w worker_class` for `services` (rq's queue names for a plain rq worker). Not waited for."""
    name = name or f"qs-test-worker-{uuid.uuid4().hex[:8]}"
    # rq's --url reads only single-server URLs; for the others rq's CLI reads QS_REDIS_URL too (workers.rq_settings).
    where = (
        ["--url", redis_url]
        if connection.parse_url(redis_url).kind == "server"
        else connection.rq_cli_options(redis_url)
    )
    argv = [
        sys.executable, "-m", "rq.cli", "worker",
        "-w", worker_class, *where, "--name", name, *services,
    ]  # fmt: skip
    return ManagedProcess(argv, name=name, env=_product_env(redis_url, services_file, env), log_dir=log_dir)


def wait_listening(
    process: ManagedProcess, redis_url: str, *, live_in: Sequence[str] = (), timeout: float = START_TIMEOUT_SECONDS
) -> None:
    """Wait until the worker named `process.name` is registered in rq and listening, and counted live by
    the API for each service of `live_in`."""
    # RQ's registry of live workers holds each worker's key, built from its name.
    worker_key = Worker.redis_worker_namespace_prefix + process.name
    client = connection.sync_client(redis_url, 1)

    def listening() -> bool:
        # Registered is not enough: rq registers the worker before it installs its SIGTERM handler,
        # and a stop in between kills it unregistered. Its first IDLE state comes after the handler.
        try:
            registered = client.sismember(REDIS_WORKER_KEYS, worker_key)
            if not registered or client.hget(worker_key, "state") not in (b"idle", b"busy"):
                return False
            now = time.time()
            return all((client.zscore(keys.live_workers(s), process.name) or 0) > now for s in live_in)
        except redis.RedisError:
            return False

    try:
        wait_until_ready(process, listening, timeout, "registered in rq:workers and listening")
    finally:
        client.close()


def start_worker(
    redis_url: str,
    services_file: str | Path,
    services: Sequence[str] = (),
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT_SECONDS,
    worker_class: str = WORKER_CLASS,
    log_dir: str | Path | None = None,
) -> ManagedProcess:
    """Run `rq worker` for `services`; return it once it is registered and listening."""
    process = spawn_worker(
        redis_url, services_file, services, name=name, env=env, worker_class=worker_class, log_dir=log_dir
    )
    wait_listening(process, redis_url, timeout=timeout)
    return process


def stop_all(processes: Sequence[ManagedProcess], grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop processes together: SIGTERM to all first (idle workers notice within a second), then wait."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.stop(grace=grace)


def write_services(path: str | Path, services: list[dict[str, Any]]) -> Path:
    """Write a services file holding `services` and return its path."""
    path = Path(path)
    path.write_text(yaml.safe_dump({"services": services}, sort_keys=False))
    return path
