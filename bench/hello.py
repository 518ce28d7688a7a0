"""The ceiling for one API process: a FastAPI hello-world route, served by uvicorn exactly as the API is."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/hello")
    async def hello() -> PlainTextResponse:
        return PlainTextResponse("hello")

    return app
