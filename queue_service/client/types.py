"""What the client returns: a put's receipt, a result, a request's status, and a stream's events."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from queue_service.client.errors import RequestFailed


def _time(ms: object) -> datetime | None:
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC) if isinstance(ms, int | float) and ms else None


@dataclass(frozen=True, slots=True)
class Result:
    """A request's result: the processor's body and status (`lastCode`; 200 when absent)."""

    request_id: str
    index: int  # its index in the sink
    data: bytes
    status: int = 200
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.data)

    def raise_for_status(self) -> Result:
        """The result itself, or RequestFailed with the processor's status and message."""
        if not self.ok:
            raise RequestFailed(self.status, self.text)
        return self


@dataclass(frozen=True, slots=True)
class Submitted:
    """A put's receipt: the index in the input queue and the request id. `result` is there when the put
    waited (`wait=`) and the request was done in time."""

    index: int
    request_id: str
    result: Result | None = None
    repeated: bool = False  # the same Idempotency-Key was put before: this is that put's receipt


@dataclass(frozen=True, slots=True)
class Status:
    """What a request is doing (`_status_`): queued, running, succeeded, failed, cancelled or expired."""

    request_id: str
    state: str
    index: int | None = None
    position: int | None = None  # items ahead of it, while queued
    deliveries: int | None = None  # while running: 2 and more after its worker was lost
    progress: Any = None
    status_code: int | None = None
    message: str = ""
    result: str | None = None  # "in_sink", or "removed" once read with auto-delete or deleted
    accepted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime | None = None
    webhooks: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state not in ("queued", "running")

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Status:
        return cls(
            request_id=str(body.get("requestId", "")),
            state=str(body.get("state", "")),
            index=body.get("index"),
            position=body.get("position"),
            deliveries=body.get("deliveries"),
            progress=body.get("progress"),
            status_code=body.get("statusCode"),
            message=str(body.get("message", "")),
            result=body.get("result"),
            accepted_at=_time(body.get("acceptedAt")),
            started_at=_time(body.get("startedAt")),
            finished_at=_time(body.get("finishedAt") or body.get("removedAt")),
            deadline=_time(body.get("deadline")),
            webhooks=dict(body.get("webhooks") or {}),
            raw=body,
        )


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress report of the processor (a fraction and a short message, as it reported them)."""

    fraction: float | None
    message: str
    raw: Any = None
    id: str = ""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the output, as the processor yielded it."""

    data: bytes
    id: str = ""

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class Done:
    """The stream's end: the request's status code, `lastCode` when not 200, a failure's message."""

    status: int
    message: str = ""
    raw: Any = None
    id: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True, slots=True)
class Restart:
    """The request was handed to another worker (the one before stopped): its output starts again from here."""

    delivery: int
    id: str = ""


StreamEvent = Progress | Chunk | Restart | Done
