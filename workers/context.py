"""RequestContext: what a processor may know of the request it runs on, beside the body, and how it reports.

A processor opts in by taking a second parameter: `def process(self, data, context)`. The sub-path is the
platform's `POST /api/predict/<service>/<path>`; the tags are the put's query parameters.

Progress: `context.progress(0.4, "step 4 of 10")` (or `yield Progress(0.4, "step 4 of 10")` from a
generator processor) reports how far the request is: a fraction in 0..1 and a short message. It shows in
`_status_`, `_search_`, the request's stream (`GET .../sink?requestId=...&_stream_=true`) and the CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from queue_service.store.model import Item

# Longest progress message kept (a status line, not a log).
MAX_PROGRESS_MESSAGE = 200


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a request is: `fraction` in 0..1, and a short message. Yield it, or pass it to `context.progress`."""

    fraction: float
    message: str = ""

    def __post_init__(self) -> None:
        # bool is an int subclass, but Progress(True) is a mistake, not 100 %.
        fraction = self.fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not math.isfinite(fraction):
            raise ValueError(f"progress fraction must be a number in 0..1, got {fraction!r}")
        if not 0 <= fraction <= 1:
            raise ValueError(f"progress fraction must be in 0..1, got {fraction!r}")
        if not isinstance(self.message, str):
            raise ValueError(f"progress message must be a str, got {type(self.message).__name__}")


class StreamSink(Protocol):
    """Where a running request's chunks and progress go (workers/streaming.py's RequestStream)."""

    def chunk(self, value: object) -> None: ...

    def progress(self, report: Progress) -> None: ...


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    service: str
    index: int
    path: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    deliveries: int = 1  # 2 and more: an earlier worker took it and stopped
    content_type: str = ""  # the put's Content-Type, as the client sent it
    stream: StreamSink | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, item: Item, stream: StreamSink | None = None) -> RequestContext:
        return cls(
            item.request_id,
            item.service,
            item.index,
            item.path,
            dict(item.tags),
            item.deliveries,
            item.content_type,
            stream,
        )

    def progress(self, fraction: float, message: str = "") -> None:
        """Report how far the request is (0..1) with a short message; a ValueError for a fraction out of range."""
        report = Progress(fraction, message[:MAX_PROGRESS_MESSAGE] if isinstance(message, str) else message)
        if self.stream is not None:
            self.stream.progress(report)
