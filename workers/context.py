"""RequestContext: what a processor may know of the request it runs on, beside the body.

A processor opts in by taking a second parameter: `def process(self, data, context)`. The sub-path is the
platform's `POST /api/predict/<service>/<path>`; the tags are the put's query parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from queue_service.store.model import Item


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    service: str
    index: int
    path: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    deliveries: int = 1  # 2 and more: an earlier worker took it and stopped
    content_type: str = ""  # the put's Content-Type, as the client sent it

    @classmethod
    def of(cls, item: Item) -> RequestContext:
        return cls(
            item.request_id, item.service, item.index, item.path, dict(item.tags), item.deliveries, item.content_type
        )
