"""Query parameters of the queue protocol: `_x_` controls, and tags (everything else).

Every malformed value is an ApiError(400) that names the parameter and says what was expected.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import QueryParams

from queue_service.durations import parse_duration
from queue_service.errors import ApiError

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
        "_watch_",
        "_window_",
        "_index_only_",
        "_auto_commit_",
        "_priority_",
    }
)
# Not tags: the request id selects an item on get.
RESERVED_NAMES = frozenset({"requestId"})
MAX_LENGTH = 10_000
MAX_TIMEOUT_SECONDS = 600.0
MAX_WINDOW = 10_000


class Params:
    """Typed access to one request's query parameters."""

    def __init__(self, query: QueryParams, allowed: Iterable[str] = KNOWN_CONTROLS) -> None:
        self.query = query
        allowed = set(allowed)
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

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(400, f"{name} must be a whole number, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise ApiError(400, f"{name} must be at least {minimum}{upper}, got {value}")
        return value

    def indexes(self, name: str = "_indexes_") -> list[int]:
        raw = self.query.get(name)
        if not raw:
            raise ApiError(400, f"{name} is required: a comma-separated list of indexes")
        try:
            values = [int(part) for part in raw.split(",") if part.strip()]
        except ValueError:
            raise ApiError(400, f"{name} must be comma-separated whole numbers, got {raw!r}") from None
        if not values or any(v <= 0 for v in values):
            raise ApiError(400, f"{name} must list indexes above 0, got {raw!r}")
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
        """Parameters that are not controls: the item's tags (put) or a tag filter (get, watch)."""
        return {k: v for k, v in self.query.items() if not k.startswith("_") and k not in RESERVED_NAMES}
