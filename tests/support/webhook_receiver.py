"""A webhook receiver for tests, run as its own uvicorn process: it verifies each delivery's signature with the
`standardwebhooks` library (as a real receiver would) and remembers what it got.

    RECEIVER_SECRET=whsec_... python -m uvicorn tests.support.webhook_receiver:create_app --factory --port N

Paths say how it answers: `/ok` 200; `/fail/<n>` 500 to the first n attempts of each webhook id, then 200;
`/hang` never answers; `/gone` 410; `/slow-first/<seconds>` answers the first attempt of each webhook id after
that long, the next ones at once. `GET /received` lists every delivery: path, webhook id, whether the signature
verified, the payload.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app() -> Starlette:
    verifier = Webhook(os.environ["RECEIVER_SECRET"])
    received: list[dict[str, Any]] = []
    attempts: Counter[str] = Counter()

    async def deliver(request: Request) -> Response:
        body = await request.body()
        webhook_id = request.headers.get("webhook-id", "")
        try:
            payload = verifier.verify(body, dict(request.headers))
            verified = True
        except WebhookVerificationError as exc:
            payload, verified = {"error": str(exc)}, False
        attempts[webhook_id] += 1
        path = request.url.path
        received.append(
            {"path": path, "webhookId": webhook_id, "verified": verified, "payload": payload, "at": time.time()}
        )
        parts = path.strip("/").split("/")
        if parts[0] == "fail" and attempts[webhook_id] <= int(parts[1]):
            return Response("not yet", status_code=500)
        if parts[0] == "hang":
            await asyncio.sleep(3600)
        if parts[0] == "gone":
            return Response("gone", status_code=410)
        if parts[0] == "slow-first" and attempts[webhook_id] == 1:
            await asyncio.sleep(float(parts[1]))
        return Response("ok")

    async def listing(request: Request) -> Response:
        return JSONResponse(received)

    async def healthz(request: Request) -> Response:
        return Response("ok")

    return Starlette(
        routes=[
            Route("/received", listing, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/{path:path}", deliver, methods=["POST"]),
        ]
    )
