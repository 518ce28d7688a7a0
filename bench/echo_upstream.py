"""An in-repo HTTP model server stand-in for the upstream processor's tests and benchmark (uvicorn, Starlette).

    python -m uvicorn bench.echo_upstream:create_app --factory --port 8080

- `GET /health`: 200 (the upstream's health path).
- `POST /inspect/<path>`: JSON of what arrived: `path`, `contentType`, `requestId`, `headers`, `body`.
- `POST /status/<code>`: answers `<code>` with the body `status <code>`.
- `POST /hang`: never answers (a hung model server).
- `POST /slow/<ms>`: the body back after `<ms>` milliseconds.
- `POST /sse/<n>/<ms>`: an OpenAI-style SSE stream (vLLM with `"stream": true`): `n` events
  `data: {"choices":[{"delta":{"content":"t<i> "}}]}` `<ms>` ms apart, then `data: [DONE]`.
- `POST /chunked/<n>/<ms>`: a chunked text/plain answer of `n` pieces `t<i> `, `<ms>` ms apart.
- `POST` anything else: the body back with its Content-Type, after `ECHO_UPSTREAM_DELAY_MS` ms (0 by
  default): a model whose answer takes that long without using the CPU.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
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

    async def pieces(request: Request, sse: bool) -> AsyncIterator[bytes]:
        count, ms = int(request.path_params["n"]), int(request.path_params["ms"])
        for i in range(count):
            if i and ms:
                await asyncio.sleep(ms / 1000)
            if sse:
                yield f"data: {json.dumps({'choices': [{'delta': {'content': f't{i} '}}]})}\n\n".encode()
            else:
                yield f"t{i} ".encode()
        if sse:
            yield b"data: [DONE]\n\n"

    async def sse(request: Request) -> Response:
        return StreamingResponse(pieces(request, True), media_type="text/event-stream")

    async def chunked(request: Request) -> Response:
        return StreamingResponse(pieces(request, False), media_type="text/plain; charset=utf-8")

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
            Route("/sse/{n:int}/{ms:int}", sse, methods=["POST"]),
            Route("/chunked/{n:int}/{ms:int}", chunked, methods=["POST"]),
            Route("/{path:path}", echo, methods=["POST"]),
        ]
    )
