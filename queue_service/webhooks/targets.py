"""Who gets a request's webhooks: the URL its put named (`_webhook_`) and the service's own, as the item keeps them.

The targets are written into the item at put (its `hooks` field, JSON), so every step that ends or starts it
(in Lua) knows which deliveries to enqueue without asking the services file. A service's webhook thus applies
to the requests put while it was configured; its URL, secret and retry settings are read at each attempt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from urllib.parse import urlsplit

from queue_service.config import WEBHOOK_EVENTS, ServiceConfig, WebhookSettings

MAX_URL_LENGTH = 2048
DEFAULT_EVENTS = ("completed",)
# The target index of the service's own webhook in a delivery: its URL is not copied into the item.
SERVICE_URL = ""


class BadWebhook(ValueError):
    """A request's `_webhook_` or `_webhook_events_` that cannot be used; the message says why."""


def parse_events(raw: str | None) -> list[str]:
    if raw is None or raw == "":
        return list(DEFAULT_EVENTS)
    events = [part.strip() for part in raw.split(",") if part.strip()]
    unknown = [event for event in events if event not in WEBHOOK_EVENTS]
    if unknown or not events:
        raise BadWebhook(f"_webhook_events_ must be a comma-separated list of {', '.join(WEBHOOK_EVENTS)}; got {raw!r}")
    return list(dict.fromkeys(events))


def check_url(url: str) -> tuple[str, int]:
    """(host, port) of a webhook URL; BadWebhook unless it is an http(s) URL with a host."""
    if len(url) > MAX_URL_LENGTH:
        raise BadWebhook(f"_webhook_ is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadWebhook(f"_webhook_ is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadWebhook(f"_webhook_ must be an http:// or https:// URL with a host, got {url!r}")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def hooks_of(service: ServiceConfig, url: str | None, events: Sequence[str]) -> str:
    """The item's `hooks` field: the request's target, then the service's (each with its events); "" for none."""
    targets: list[dict[str, object]] = []
    if url:
        targets.append({"url": url, "events": list(events)})
    webhook = service.webhook
    if webhook is not None and webhook.url:
        targets.append({"url": SERVICE_URL, "events": list(webhook.events)})
    return json.dumps(targets, separators=(",", ":")) if targets else ""


def settings_for_requests(service: ServiceConfig) -> WebhookSettings:
    """The service's webhook settings, which a request's own webhook is signed and retried by; BadWebhook
    when it has none (no secret to sign with)."""
    if service.webhook is None:
        raise BadWebhook(
            f"service {service.name!r} has no webhook settings (webhook.secret in the services file): "
            "its webhooks could not be signed"
        )
    return service.webhook
