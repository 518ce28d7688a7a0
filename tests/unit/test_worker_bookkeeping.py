"""QueueWorker's rq bookkeeping: no Redis round trip that says nothing new (state, heartbeat)."""

from __future__ import annotations

import threading
from pathlib import Path

import fakeredis
import pytest
import redis
from rq.worker import WorkerStatus

from workers.worker import QueueWorker


def count_commands(client: redis.Redis) -> list[str]:
    """Record the commands `client` sends outside pipelines (in the returned list, also `client.sent`)."""
    sent: list[str] = []
    send = client.execute_command

    def execute_command(*args, **options):
        sent.append(str(args[0]).upper())
        return send(*args, **options)

    client.execute_command = execute_command  # type: ignore[method-assign]
    client.sent = sent  # type: ignore[attr-defined]
    return sent


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> QueueWorker:
    services = tmp_path / "services.yaml"
    services.write_text("services:\n  - name: echo\n    processor: workers.examples:Echo\n")
    monkeypatch.setenv("QS_SERVICES", str(services))
    # The worker builds its own client to the server of the one it is given (with its retry policy):
    # the commands are counted on that one.
    worker = QueueWorker(["echo"], connection=fakeredis.FakeRedis(), name="bookkeeping-test")
    count_commands(worker.connection)
    return worker


def test_an_unchanged_state_is_written_once(worker: QueueWorker) -> None:
    worker.set_state(WorkerStatus.IDLE)
    worker.set_state(WorkerStatus.IDLE)
    worker.set_state(WorkerStatus.BUSY)
    worker.set_state(WorkerStatus.BUSY)
    assert worker.connection.sent == ["HSET"] * 2
    assert worker.connection.hget(worker.key, "state") == b"busy"


def test_between_two_items_the_worker_stays_busy_until_it_waits_for_work(worker: QueueWorker) -> None:
    worker.set_state(WorkerStatus.BUSY)
    worker.set_state(WorkerStatus.IDLE)  # rq's loop, after each item
    worker.set_state(WorkerStatus.BUSY)
    assert worker.connection.sent == ["HSET"]  # Redis still says busy

    worker._write_idle()  # what the worker does when it finds no work and is about to wait
    worker._write_idle()
    assert worker.connection.sent == ["HSET"] * 2
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


class ChannelThreadThatWaitsOnStop:
    """redis-py 8.2's pubsub thread once it has read the unsubscribe's answer: a `stop()` without a timeout
    waits for it to end, and it waits for a subscription that never comes (rq's sleep_time: 60 s)."""

    def __init__(self) -> None:
        self.never = threading.Event()
        self.joins: list[float | None] = []

    def stop(self, timeout: float | None = None) -> None:
        if timeout is None:
            self.never.wait()

    def join(self, timeout: float | None = None) -> None:
        self.joins.append(timeout)

    def is_alive(self) -> bool:
        return True


class Channel:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def unsubscribe(self) -> None:
        self.calls.append("unsubscribe")

    def close(self) -> None:
        self.calls.append("close")


def test_teardown_does_not_wait_on_a_command_channel_thread_that_would_not_end(worker: QueueWorker) -> None:
    thread, channel = ChannelThreadThatWaitsOnStop(), Channel()
    worker.pubsub_thread, worker.pubsub = thread, channel  # type: ignore[assignment]

    unsubscribing = threading.Thread(target=worker.unsubscribe, daemon=True)
    unsubscribing.start()
    unsubscribing.join(timeout=30)

    assert not unsubscribing.is_alive(), "unsubscribe waited on the channel's thread"
    assert channel.calls == ["unsubscribe", "close"]
    assert thread.joins and all(timeout is not None for timeout in thread.joins)  # a bounded wait only
