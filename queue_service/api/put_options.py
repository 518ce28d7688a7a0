"""What a put may ask beyond the platform's protocol: a webhook, a deadline, idempotency, and waiting for the result.

`_webhook_=<url>` (with `_webhook_events_=start,progress,output,completed`, default completed), `_ttl_=<duration>`
(else the service's `queue.request_ttl`), the `Idempotency-Key` header (the same key within 24 h answers the
first put's index and request id, storing nothing), and `Prefer: wait=<seconds>` (RFC 7240: answer 200 with
the result if it is done in time, else 202 with the index). A webhook URL that resolves to a loopback, private,
link-local or metadata address is refused here (400, saying which) unless the service sets
`webhook.allow_private`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from starlette.requests import Request

from queue_service.api.errors import ApiError
from queue_service.api.params import MAX_TIMEOUT_SECONDS, Params
from queue_service.config import MAX_TTL_SECONDS, ServiceConfig
from queue_service.durations import parse_duration
from queue_service.webhooks import targets
from queue_service.webhooks.addresses import RefusedAddress, resolve

CONTROLS = frozenset({"_webhook_", "_webhook_events_", "_ttl_"})
IDEMPOTENCY_HEADER = "idempotency-key"
MAX_IDEMPOTENCY_KEY = 255
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class PutOptions:
    hooks: str = ""  # the item's webhook targets (JSON), "" for none
    ttl_ms: int = 0
    idempotency_digest: str = ""
    wait_seconds: float | None = None  # Prefer: wait=


async def put_options(request: Request, params: Params, service: ServiceConfig) -> PutOptions:
    return PutOptions(
        hooks=await _hooks(params, service),
        ttl_ms=_ttl_ms(params, service),
        idempotency_digest=_idempotency(request),
        wait_seconds=_prefer_wait(request),
    )


async def _hooks(params: Params, service: ServiceConfig) -> str:
    url = params.query.get("_webhook_") or None
    try:
        events = targets.parse_events(params.query.get("_webhook_events_"))
        if url is None:
            if "_webhook_events_" in params.query:
                raise targets.BadWebhook("_webhook_events_ needs _webhook_")
            return targets.hooks_of(service, None, events)
        settings = targets.settings_for_requests(service)
        host, port = targets.check_url(url)
        await resolve(host, port, allow_private=settings.allow_private)
    except (targets.BadWebhook, RefusedAddress) as exc:
        raise ApiError(400, f"_webhook_: {exc}" if isinstance(exc, RefusedAddress) else str(exc)) from None
    return targets.hooks_of(service, url, events)


def _ttl_ms(params: Params, service: ServiceConfig) -> int:
    raw = params.query.get("_ttl_")
    if raw is None or raw == "":
        return int(service.queue.request_ttl * 1000)
    try:
        seconds = parse_duration(raw)
    except ValueError as exc:
        raise ApiError(400, f"_ttl_: {exc}") from None
    if not 0 < seconds <= MAX_TTL_SECONDS:
        raise ApiError(400, f"_ttl_ must be above 0 and at most {MAX_TTL_SECONDS // 3600} h, got {raw!r}")
    return max(1, int(seconds * 1000))


def _idempotency(request: Request) -> str:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return ""
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise ApiError(400, f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable characters")
    # Hashed: the key names a Redis key, and the client's text must not shape it.
    return hashlib.sha256(key.encode()).hexdigest()


def _prefer_wait(request: Request) -> float | None:
    found = _PREFER_WAIT.search(request.headers.get("prefer", ""))
    return min(float(found.group(1)), MAX_TIMEOUT_SECONDS) if found else None
