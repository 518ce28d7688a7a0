"""Shared fixtures (a real redis-server per test, a services file factory, the official client's Python)
and how the suite runs in parallel: which tests share an xdist group, and the measured numbers in the summary."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from queue_service.embedded_redis import RedisServer
from queue_service.testing import write_services
from tests.support import eas

ServicesFileFactory = Callable[[list[dict[str, Any]]], Path]

TESTS_DIR = Path(__file__).resolve().parent
# xdist groups (`--dist loadgroup`): the tests of one group run on one xdist worker, one after another.
#   heavy: CPU-heavy runs (the flood, the benchmark, 2,000 official-client puts), never beside each other;
#   hostile: tests/hostile/, 1,000+ connections each: beside each other they would measure the machine;
#   status_codes, http_queue: modules whose tests share one stack (and, for status codes, run in order);
#   language_model: tests/unit/test_examples.py, whose model is loaded once per process.
#   engines: tests/engines/ (Sentinel failovers, a Redis Cluster, several API processes): each runs many
#     processes under load and measures a failover or a slot move, so one at a time, beside the rest.
# Directories whose tests all join a group, whatever their module says:
GROUPED_DIRECTORIES = {"hostile": "hostile", "engines": "engines"}
# Lines a test prints with its measured numbers; the summary repeats them, since xdist hides `-s` output.
MEASURED_PREFIXES = ("RELIABILITY ", "TIMING ")
GROUP_LOST = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Iterator[None]:
    # Before xdist's own hook, which reads the groups (--dist loadgroup) and marks them in the node ids.
    for item in items:
        try:
            directory = item.path.resolve().relative_to(TESTS_DIR).parts[0]
        except ValueError:
            continue
        group = GROUPED_DIRECTORIES.get(directory)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    yield
    # A pytest/xdist pair that drops the groups would run floods side by side and a module's tests on
    # several workers, silently (pytest-xdist issue 1386): such tests fail instead, saying why.
    if getattr(config.option, "loadgroup", False):
        for item in items:
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
                item.stash[GROUP_LOST] = "pytest-xdist did not honour this test's xdist_group (--dist loadgroup)"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if GROUP_LOST in item.stash:
        pytest.fail(item.stash[GROUP_LOST], pytrace=False)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        line.strip()
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        if getattr(report, "when", None) == "call"
        for line in report.capstdout.splitlines()
        if line.startswith(MEASURED_PREFIXES)
    ]
    if lines:
        terminalreporter.write_sep("=", "measured numbers")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    # Data and redis.log under tmp_path, so a failed test's Redis log is kept by pytest.
    with RedisServer(data_dir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def services_file(tmp_path: Path) -> ServicesFileFactory:
    """`make(services)` writes a new services file under tmp_path and returns its path."""
    written: list[Path] = []

    def make(services: list[dict[str, Any]]) -> Path:
        written.append(write_services(tmp_path / f"services-{len(written)}.yaml", services))
        return written[-1]

    return make


@pytest.fixture(scope="session")
def eas_python() -> str:
    return eas.ensure_eas_venv()
