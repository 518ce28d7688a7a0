"""The dashboard's paths: the page and its assets, and the JSON it polls (`views.py`), behind `access.py`."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from queue_service.api.context import app_of
from queue_service.api.dashboard import access, views
from queue_service.api.errors import ApiError

# The page's own files, in this package: nothing is loaded from elsewhere (the CSP says so too).
ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}


def _asset(name: str) -> bytes:
    return (resources.files("queue_service.api.dashboard") / "static" / name).read_bytes()


async def page(request: Request) -> Response:
    access.check_page(request, app_of(request).settings.admin_token)
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


async def asset(request: Request) -> Response:
    access.check_page(request, app_of(request).settings.admin_token)
    name = request.path_params["name"]
    if name not in ASSETS:
        raise ApiError(404, f"no such dashboard file: {name}")
    return Response(_asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


def _data(body: object) -> JSONResponse:
    return JSONResponse(body, headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


async def overview(request: Request) -> Response:
    app = app_of(request)
    access.check_data(request, app.settings.admin_token)
    return _data(await views.overview(app))


async def failures(request: Request) -> Response:
    app = app_of(request)
    access.check_data(request, app.settings.admin_token)
    return _data(await views.failures(app))


async def lookup(request: Request) -> Response:
    app = app_of(request)
    access.check_data(request, app.settings.admin_token)
    request_id = request.query_params.get("id", "").strip()
    if not request_id:
        raise ApiError(400, "id= is needed: the request id a put answered with")
    wanted = request.query_params.get("service")
    services = [app.service(wanted)] if wanted else list(app.services.services)
    found = await views.request(app, request_id, services)
    if found is None:
        raise ApiError(404, f"no service knows request id {request_id!r} (or it expired)")
    return _data(found)


def routes() -> list[Route]:
    return [
        Route("/dashboard", page, methods=["GET"], include_in_schema=False),
        Route("/dashboard/static/{name}", asset, methods=["GET"], include_in_schema=False),
        Route("/dashboard/api/overview", overview, methods=["GET"], include_in_schema=False),
        Route("/dashboard/api/failures", failures, methods=["GET"], include_in_schema=False),
        Route("/dashboard/api/request", lookup, methods=["GET"], include_in_schema=False),
    ]
