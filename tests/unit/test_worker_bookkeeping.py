"""QueueWorker's rq bookkeeping: no Redis round trip that says nothing new (state, heartbeat)."""

from __future__ import annotations

from pathlib import Path

import fakeredis
import pytest
from rq.worker import WorkerStatus

from workers.worker import QueueWorker


class Counting(fakeredis.FakeRedis):
    """Counts the commands sent outside pipelines."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []

    def execute_command(self, *args, **options):
        self.sent.append(str(args[0]).upper())
        return super().execute_command(*args, **options)


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> QueueWorker:
    services = tmp_path / "services.yaml"
    services.write_text("services:\n  - name: echo\n    processor: workers.examples:Echo\n")
    monkeypatch.setenv("QS_SERVICES", str(services))
    connection = Counting()
    worker = QueueWorker(["echo"], connection=connection, name="bookkeeping-test")
    connection.sent.clear()
    return worker


def test_an_unchanged_state_is_written_once(worker: QueueWorker) -> None:
    worker.set_state(WorkerStatus.IDLE)
    worker.set_state(WorkerStatus.IDLE)
    worker.set_state(WorkerStatus.BUSY)
    worker.set_state(WorkerStatus.IDLE)
    assert worker.connection.sent == ["HSET"] * 3
    assert worker.get_state() == WorkerStatus.IDLE
    assert worker.connection.hget(worker.key, "state") == b"idle"


def test_a_state_written_in_a_pipeline_is_written_again_outside(worker: QueueWorker) -> None:
    worker.set_state(WorkerStatus.IDLE)
    with worker.connection.pipeline() as pipe:
        worker.set_state(WorkerStatus.BUSY, pipeline=pipe)
        pipe.execute()
    worker.set_state(WorkerStatus.IDLE)
    assert worker.connection.hget(worker.key, "state") == b"idle"


def test_a_plain_heartbeat_right_after_another_is_skipped(worker: QueueWorker) -> None:
    worker.heartbeat()
    sent = len(worker.connection.sent)
    assert sent > 0
    worker.heartbeat()
    assert len(worker.connection.sent) == sent
    worker.heartbeat(timeout=60)  # an explicit timeout always goes out
    assert len(worker.connection.sent) > sent
