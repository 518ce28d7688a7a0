"""The HTTP front end: FastAPI app, queue routes, watch, sync, auth, params, metrics — HTTP <-> store, nothing else.

`queue_service.api:create_app` is what uvicorn runs (`--factory`).
"""

from queue_service.api.app import create_app

__all__ = ["create_app"]
