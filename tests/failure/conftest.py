"""Fixtures of the failure tests: one real redis-server (AOF on), API and workers per test, all stopped after it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queue_service.embedded_redis import RedisServer
from queue_service.testing import write_services
from tests.failure.harness import ASYNC_CHAOS, BATCH_CHAOS, CHAOS, Stack

FLOOD_BOUND = 20
LEASE_SECONDS = 3  # the lease of `work`

# Small leases keep the tests fast; `work10` keeps the defaults (lease 10 s) to prove the 15 s promise.
SERVICES: list[dict[str, Any]] = [
    {
        "name": "work",
        "processor": CHAOS,
        "queue": {"lease_seconds": LEASE_SECONDS},
        "metadata": {"rpc": {"max_queue_size": 1000}},
    },
    {"name": "work10", "processor": CHAOS},
    {"name": "fragile", "processor": CHAOS, "queue": {"lease_seconds": 2, "max_delivery": 2}},
    {"name": "limited", "processor": CHAOS, "queue": {"lease_seconds": 2, "max_processing_seconds": 2}},
    {"name": "tiny-sink", "processor": CHAOS, "queue": {"lease_seconds": 2, "sink": {"max_length": 3}}},
    {
        "name": "batched",
        "processor": BATCH_CHAOS,
        "queue": {"lease_seconds": 2},
        "metadata": {"rpc": {"batching": True, "max_batch_size": 4, "max_batch_timeout": 50, "max_queue_size": 100}},
    },
    {
        "name": "parallel",
        "processor": ASYNC_CHAOS,
        "queue": {"lease_seconds": 2, "max_processing_seconds": 4},
        "metadata": {"rpc": {"worker_threads": 4, "max_queue_size": 100}},
    },
    {
        "name": "flood",
        "processor": CHAOS,
        "queue": {"lease_seconds": 3},
        "metadata": {"rpc": {"max_queue_size": FLOOD_BOUND}},
    },
]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    services_file = write_services(tmp_path / "services.yaml", SERVICES)
    with RedisServer(data_dir=tmp_path / "redis", appendonly=True) as server:
        stack = Stack(tmp_path, server, services_file)
        try:
            yield stack
        finally:
            stack.stop()
