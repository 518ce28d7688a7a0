"""The test-support process helpers: log capture, stopping, and waiting until a process is ready."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from fastapi import FastAPI

from queue_service.testing import (
    ManagedProcess,
    ProcessStartError,
    start_api,
    start_worker,
    write_services,
)

IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up'); time.sleep(60)"


def healthz_app() -> FastAPI:
    """A stand-in for the API's factory: start_api only needs GET /healthz."""
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _python(code: str, tmp_path: Path) -> ManagedProcess:
    return ManagedProcess([sys.executable, "-c", code], name="child", log_dir=tmp_path)


def test_output_and_errors_go_to_the_log(tmp_path: Path) -> None:
    child = _python("import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(3)", tmp_path)
    assert child.wait(10) == 3
    assert child.returncode == 3
    assert "to stdout" in child.log_text()
    assert "to stderr" in child.log_tail(lines=1)


def test_stop_terminates_a_running_child(tmp_path: Path) -> None:
    with _python("import time; time.sleep(60)", tmp_path) as child:
        assert child.is_running()
    assert child.returncode == -15


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    child = _python(IGNORES_SIGTERM, tmp_path)
    try:
        while "up" not in child.log_text():
            assert child.is_running()
            time.sleep(0.01)
        assert child.stop(grace=0.5) == -9
    finally:
        child.kill()


def test_wait_times_out_on_a_running_child(tmp_path: Path) -> None:
    child = _python("import time; time.sleep(60)", tmp_path)
    with pytest.raises(Exception, match="timed out"):
        child.wait(0.1)
    child.kill()
    assert child.wait(5) == -9


def test_start_api_returns_once_healthz_answers(redis_url: str, tmp_path: Path) -> None:
    services = write_services(tmp_path / "services.yaml", [])
    api, base_url = start_api(redis_url, services, app="tests.unit.test_processes:healthz_app", log_dir=tmp_path)
    try:
        assert httpx.get(f"{base_url}/healthz").status_code == 200
    finally:
        api.stop()


def test_start_api_reports_a_process_that_dies(redis_url: str, tmp_path: Path) -> None:
    services = write_services(tmp_path / "services.yaml", [])
    with pytest.raises(ProcessStartError, match=r"exited with code .* log tail"):
        start_api(redis_url, services, app="no_such_module:create_app", log_dir=tmp_path)


def test_start_worker_returns_once_registered(redis_url: str, sync_redis: redis.Redis, tmp_path: Path) -> None:
    services = write_services(tmp_path / "services.yaml", [])
    worker = start_worker(redis_url, services, ["echo"], name="w1", worker_class="rq.worker.Worker", log_dir=tmp_path)
    try:
        assert sync_redis.sismember("rq:workers", "rq:worker:w1")
    finally:
        worker.stop()
    assert not sync_redis.sismember("rq:workers", "rq:worker:w1")


def test_write_services_writes_the_services_key(tmp_path: Path) -> None:
    services = [{"name": "echo", "processor": "workers.examples:Echo"}]
    path = write_services(tmp_path / "services.yaml", services)
    assert yaml.safe_load(path.read_text()) == {"services": services}


def test_services_file_fixture_writes_a_new_file_each_time(
    services_file: Callable[[list[dict[str, Any]]], Path],
) -> None:
    first = services_file([{"name": "a", "processor": "m:A"}])
    second = services_file([{"name": "b", "processor": "m:B"}])
    assert first != second
    assert yaml.safe_load(second.read_text())["services"][0]["name"] == "b"
