"""Processors the protocol tests run in real workers: each answers with what the worker handed it."""

from __future__ import annotations

from workers.context import RequestContext


class RequestPath:
    """Answers with the request's sub-path and body, as the processor saw them."""

    def initialize(self) -> None:
        """Nothing to load."""

    def process(self, data: bytes, context: RequestContext) -> dict[str, str]:
        return {"path": context.path, "data": data.decode()}
