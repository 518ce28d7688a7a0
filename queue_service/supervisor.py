"""The process supervision of `queue-service up`: the API and each service's workers, until stop or failure.

A worker that exits is started again, but one that keeps dying right after its start (a processor
whose `initialize()` raises, a missing package) is not restarted forever: each quick exit doubles
the wait before the next start, and after `QS_UP_START_ATTEMPTS` quick exits in a row `up` gives
up, stops everything and says which service failed. The API exiting ends `up` as a failure: there
is nothing to serve without it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from queue_service.embedded_redis import RedisServer

# How often the supervisor looks at its children: the delay before a crash is noticed.
POLL_SECONDS = 0.2
# How long workers may take to stop once the embedded Redis is gone: they can hand in nothing more.
LOST_REDIS_GRACE_SECONDS = 2.0
STOP_GRACE_SECONDS = 30.0


class UpSettings(BaseSettings):
    """`queue-service up`'s own knobs, from QS_UP_* environment variables (tests make them short)."""

    model_config = SettingsConfigDict(env_prefix="QS_UP_", extra="ignore")

    # Quick exits in a row (per worker) before `up` gives up.
    start_attempts: Annotated[int, Field(ge=1)] = 5
    # The wait before restarting after the first quick exit; it doubles with each one (1, 2, 4, 8 s).
    backoff_seconds: Annotated[float, Field(ge=0)] = 1.0
    # A worker that exits sooner than this after its start counts as failing to start.
    quick_exit_seconds: Annotated[float, Field(ge=0)] = 30.0
    # Longest the import of every processor may take before start-up (a large framework's import is slow).
    preflight_timeout_seconds: Annotated[float, Field(gt=0)] = 120.0


class SupervisionFailed(Exception):
    """`up` cannot go on: the API exited, or a service's workers keep failing at start."""


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclass
class WorkerSlot:
    """One worker process of one service, and its record of quick exits."""

    service: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_exits: int = 0
    start_at: float = 0.0  # when the next process may start (the backoff); used while process is None


@dataclass
class Supervisor:
    """Starts the API and the workers, restarts workers with backoff, and stops them all."""

    env: Mapping[str, str]
    settings: UpSettings
    say: Callable[[str], None]
    apis: list[subprocess.Popen[bytes]] = field(default_factory=list)
    slots: list[WorkerSlot] = field(default_factory=list)

    def start_api(self, argv: Sequence[str], pass_fds: Sequence[int] = (), count: int = 1) -> None:
        """`count` API processes on one listening socket (passed down as a descriptor): the kernel spreads the
        connections over them, as uvicorn's own workers share one socket."""
        self.apis = [subprocess.Popen(list(argv), env=dict(self.env), pass_fds=tuple(pass_fds)) for _ in range(count)]

    def add_workers(self, service: str, argv: Sequence[str], count: int) -> None:
        for _ in range(count):
            slot = WorkerSlot(service, list(argv))
            self._start(slot)
            self.slots.append(slot)

    def _start(self, slot: WorkerSlot) -> None:
        slot.process = subprocess.Popen(slot.argv, env=dict(self.env))
        slot.started_at = time.monotonic()

    def run(self, stopping: Callable[[], bool]) -> None:
        """Watch the children until `stopping()` says so; SupervisionFailed when `up` cannot go on."""
        while not stopping():
            time.sleep(POLL_SECONDS)
            if stopping():
                return
            for api in self.apis:
                if api.poll() is not None:
                    raise SupervisionFailed(f"the API {describe_exit(api.returncode)}; stopped everything")
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is None:
                    if now >= slot.start_at:
                        self._start(slot)
                elif slot.process.poll() is not None:
                    self._exited(slot, now)

    def _exited(self, slot: WorkerSlot, now: float) -> None:
        assert slot.process is not None
        process, slot.process = slot.process, None
        settings = self.settings
        if now - slot.started_at < settings.quick_exit_seconds:
            slot.quick_exits += 1
        else:
            slot.quick_exits = 0  # it ran fine for a while: a new failure, not a failing start
        if slot.quick_exits >= settings.start_attempts:
            raise SupervisionFailed(
                f"service {slot.service!r}: its worker {describe_exit(process.returncode)} within "
                f"{settings.quick_exit_seconds:g} s of starting, {slot.quick_exits} times in a row; "
                "gave up and stopped everything (the worker's error is above)"
            )
        delay = settings.backoff_seconds * 2 ** (slot.quick_exits - 1) if slot.quick_exits else 0.0
        slot.start_at = now + delay
        self.say(f"{slot.service}: worker {process.pid} {describe_exit(process.returncode)}; restarting in {delay:g} s")

    def processes(self) -> list[subprocess.Popen[bytes]]:
        workers = [slot.process for slot in self.slots if slot.process is not None]
        return [*workers, *self.apis]

    def stop_all(self, grace: float = STOP_GRACE_SECONDS, redis_server: RedisServer | None = None) -> None:
        """SIGTERM everyone (workers finish the item in hand), then SIGKILL what is left after `grace`.

        The embedded redis-server runs in its own session, so Ctrl-C does not stop it first; but if it
        is gone anyway (killed), a worker would keep retrying to write its result to it, and waiting the
        whole grace would only delay the exit.
        """
        processes = self.processes()
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(process.poll() is None for process in processes):
            if redis_server is not None and not redis_server.is_running():
                deadline = min(deadline, time.monotonic() + LOST_REDIS_GRACE_SECONDS)
            time.sleep(0.05)
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
