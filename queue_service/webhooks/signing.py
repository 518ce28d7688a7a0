"""Signing a delivery the Standard Webhooks way (`webhook-id`, `webhook-timestamp`, `webhook-signature`).

With the `standardwebhooks` package, so that a receiver verifies with any Standard Webhooks library and the
service's `whsec_...` secret.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

from standardwebhooks import Webhook


@lru_cache(maxsize=64)
def _signer(secret: str) -> Webhook:
    return Webhook(secret)


def signed_headers(secret: str, webhook_id: str, body: str, at: datetime | None = None) -> dict[str, str]:
    """The headers of one attempt: the same `webhook-id` on every attempt, the attempt's own timestamp."""
    at = at or datetime.now(tz=UTC)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": _signer(secret).sign(webhook_id, at, body),
        "content-type": "application/json",
    }
