"""Query parameters of the queue protocol: `_x_` controls, and tags (everything else).

Every malformed value is an ApiError(400) that names the parameter and says what was expected. Numbers
are ASCII digits only (Python's int() also reads other scripts' digits, such as "١٢"), and indexes stay
within what a stream id holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from starlette.datastructures import QueryParams

from queue_service.api.errors import ApiError
from queue_service.durations import parse_duration
from queue_service.protocol import PRIORITY_HEADER, PRIORITY_PARAMETER, RESERVED_TAGS

KNOWN_CONTROLS = frozenset(
    {
        "_index_",
        "_length_",
        "_timeout_",
        "_raw_",
        "_auto_delete_",
        "_indexes_",
        "_trunc_",
        "_attrs_",
        "_search_",
        "_status_",
        "_watch_",
        "_window_",
        "_index_only_",
        "_auto_commit_",
        "_priority_",
        "_count_",
        "_eos_",
        "_force_",
        "_negative_",
        "_stream_",
    }
)
# Not tags: the request id selects an item on get.
SELECTORS = frozenset({"requestId"})
MAX_LENGTH = 10_000
MAX_TIMEOUT_SECONDS = 600.0
MAX_WINDOW = 10_000
# The largest index: indexes are given out by Redis INCR (a signed 64-bit counter).
MAX_INDEX = 2**63 - 1
_DIGITS = re.compile(r"[0-9]+")


class Params:
    """Typed access to one request's query parameters."""

    __slots__ = ("_item_tags", "query")

    def __init__(self, query: QueryParams, allowed: Iterable[str] = KNOWN_CONTROLS) -> None:
        self.query = query
        self._item_tags: dict[str, str] | None = None
        allowed = allowed if isinstance(allowed, frozenset | set) else set(allowed)
        for name in query:
            if name.startswith("_") and name not in allowed:
                raise ApiError(400, f"unknown parameter {name!r} for this operation")

    def flag(self, name: str, default: bool = False) -> bool:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        value = raw.lower()
        if value in {"true", "1", "yes"}:
            return True
        if value in {"false", "0", "no"}:
            return False
        raise ApiError(400, f"{name} must be true or false, got {raw!r}")

    def priority(self, headers: Mapping[str, str]) -> int:
        """`_priority_`: a flag (`true`, `1`) or a level (the Java client sends N > 1), from the query or, as the
        Go client sends it, from the header the attributes name (`meta.header.priority`). 0: a normal item."""
        for raw, where in ((self.query.get(PRIORITY_PARAMETER), PRIORITY_PARAMETER), *_priority_headers(headers)):
            if raw is None or raw == "":
                continue
            value = raw.strip().lower()
            if value in {"true", "yes"}:
                return 1
            if value in {"false", "no"}:
                return 0
            if not _DIGITS.fullmatch(value) or len(value) > 18:
                raise ApiError(400, f"{where} must be true, false or a priority level (a whole number), got {raw!r}")
            return int(value)
        return 0

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int = MAX_INDEX) -> int:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        value = _whole_number(name, raw)
        if value < minimum or value > maximum:
            raise ApiError(400, f"{name} must be at least {minimum} and at most {maximum}, got {raw}")
        return value

    def indexes(self, name: str = "_indexes_") -> list[int]:
        raw = self.query.get(name)
        if not raw:
            raise ApiError(400, f"{name} is required: a comma-separated list of indexes")
        parts = [part.strip() for part in raw.split(",") if part.strip()]
        if not parts or not all(_DIGITS.fullmatch(part) for part in parts):
            raise ApiError(400, f"{name} must be comma-separated whole numbers, got {raw!r}")
        values = [int(part) for part in parts]
        if any(v <= 0 or v > MAX_INDEX for v in values):
            raise ApiError(400, f"{name} must list indexes from 1 to {MAX_INDEX}, got {raw!r}")
        return values

    def duration(self, name: str, default: float) -> float:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            seconds = parse_duration(raw)
        except ValueError as exc:
            raise ApiError(400, f"{name}: {exc}") from None
        if seconds > MAX_TIMEOUT_SECONDS:
            raise ApiError(400, f"{name} must be at most {MAX_TIMEOUT_SECONDS:g}s, got {raw!r}")
        return seconds

    def tags(self) -> dict[str, str]:
        """Parameters that are not controls: a tag filter (get, watch). `lastCode` filters too."""
        return {k: v for k, v in self.query.items() if not k.startswith("_") and k not in SELECTORS}

    def item_tags(self) -> dict[str, str]:
        """The tags of an item being put: the names the service writes itself are refused. Worked out once
        (a put checks them before reading the body, then uses them)."""
        if self._item_tags is None:
            tags = {k: v for k, v in self.query.items() if not k.startswith("_")}
            forged = sorted(RESERVED_TAGS & tags.keys())
            if forged:
                raise ApiError(400, f"tag {forged[0]!r} is reserved: the service writes it on results")
            self._item_tags = tags
        return self._item_tags


def _priority_headers(headers: Mapping[str, str]) -> list[tuple[str | None, str]]:
    # Ours first; `_priority_` is what the attributes named before (a client may have them cached).
    return [(headers.get(name), f"header {name}") for name in (PRIORITY_HEADER, PRIORITY_PARAMETER)]


def _whole_number(name: str, raw: str) -> int:
    if not _DIGITS.fullmatch(raw):
        raise ApiError(400, f"{name} must be a whole number (ASCII digits), got {raw!r}")
    return int(raw)
