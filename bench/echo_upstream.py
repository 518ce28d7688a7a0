"""An in-repo HTTP model server stand-in for the upstream processor's tests and benchmark (uvicorn, Starlette).

    python -m uvicorn bench.echo_upstream:create_app --factory --port 8080

- `GET /health`: 200 (the upstream's health path).
- `POST /inspect/<path>`: JSON of what arrived: `path`, `contentType`, `requestId`, `headers`, `body`.
- `POST /status/<code>`: answers `<code>` with the body `status <code>`.
- `POST /hang`: never answers (a hung model server).
- `POST /slow/<ms>`: the body back after `<ms>` milliseconds.
- `POST` anything else: the body back with its Content-Type, after `ECHO_UPSTREAM_DELAY_MS` ms (0 by
  default): a model whose answer takes that long without using the CPU.
"""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

DELAY_ENV = "ECHO_UPSTREAM_DELAY_MS"


def create_app() -> Starlette:
    delay = float(os.environ.get(DELAY_ENV, "0")) / 1000

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def inspect(request: Request) -> Response:
        return JSONResponse(
            {
                "path": request.url.path,
                "contentType": request.headers.get("content-type", ""),
                "requestId": request.headers.get("x-eas-queueservice-request-id", ""),
                "headers": sorted(request.headers.keys()),
                "body": (await request.body()).decode(errors="replace"),
            }
        )

    async def status(request: Request) -> Response:
        code = int(request.path_params["code"])
        return PlainTextResponse(f"status {code}", status_code=code)

    async def hang(request: Request) -> Response:
        await asyncio.sleep(3600)
        return PlainTextResponse("late")

    async def slow(request: Request) -> Response:
        await asyncio.sleep(int(request.path_params["ms"]) / 1000)
        return Response(await request.body(), media_type=request.headers.get("content-type"))

    async def echo(request: Request) -> Response:
        body = await request.body()
        if delay:
            await asyncio.sleep(delay)
        return Response(body, media_type=request.headers.get("content-type", "application/octet-stream"))

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/inspect/{path:path}", inspect, methods=["POST"]),
            Route("/status/{code:int}", status, methods=["POST"]),
            Route("/hang", hang, methods=["POST"]),
            Route("/slow/{ms:int}", slow, methods=["POST"]),
            Route("/{path:path}", echo, methods=["POST"]),
        ]
    )
