"""`rq worker` started by hand, exactly as workers/worker.py and the README document it.

QS_SERVICES=services.yaml rq worker -w workers.worker.QueueWorker --url redis://host:6379/0 [service ...]
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from queue_service.store import keys
from queue_service.testing import ManagedProcess
from tests.integration.conftest import REQUEST_ID, ApiFactory, stop_all, wait_until

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def by_hand() -> Iterator[list[ManagedProcess]]:
    """Workers started as a user would: the `rq` command, from a directory outside the project."""
    started: list[ManagedProcess] = []
    yield started
    stop_all(started)


def rq_worker(redis_url: str, services: Path, cwd: Path, *names: str) -> ManagedProcess:
    log_name = f"rq-worker-{'-'.join(names) or 'all'}"
    argv = [str(VENV_BIN / "rq"), "worker", "-w", "workers.worker.QueueWorker", "--url", redis_url, *names]
    return ManagedProcess(argv, name=log_name, env={"QS_SERVICES": str(services)}, log_dir=cwd, cwd=cwd)


def test_rq_workers_started_by_hand_serve_the_api_and_rq_info_lists_them(
    api: ApiFactory,
    redis_url: str,
    sync_redis: redis.Redis,
    standard_services: Path,
    by_hand: list[ManagedProcess],
    tmp_path: Path,
) -> None:
    service = api()
    # Two workers: one for every service of the file, one for `echo` only.
    by_hand.append(rq_worker(redis_url, standard_services, tmp_path))
    by_hand.append(rq_worker(redis_url, standard_services, tmp_path, "echo"))
    names = wait_until(
        lambda: (live := sync_redis.zrange(keys.live_workers("echo"), 0, -1)) and len(live) == 2 and live,
        20,
        "both workers live for echo",
    )
    with service.client() as http:
        answer = http.post("/api/predict/echo", content=b"hello")
        assert answer.status_code == 200
        result = http.get(
            "/api/predict/echo/sink",
            params={"requestId": answer.headers[REQUEST_ID], "_raw_": "true", "_timeout_": "4s"},
        )
        assert result.content == b"hello"
        # Only the worker started without names serves `sleep`.
        slept = http.post("/api/predict/sleep", content=b"0")
        result = http.get(
            "/api/predict/sleep/sink",
            params={"requestId": slept.headers[REQUEST_ID], "_raw_": "true", "_timeout_": "4s"},
        )
        assert result.json() == {"slept": 0.0}

    info = subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", "--url", redis_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert info.returncode == 0, info.stderr
    for name in names:
        assert name.decode() in info.stdout
    assert "2 workers" in info.stdout
    print(info.stdout)
