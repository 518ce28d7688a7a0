"""Who may see the dashboard: the holder of `QS_ADMIN_TOKEN` (Bearer), or with none set, loopback clients only.

The page and its assets carry no data and are served to anyone the data would be served to, or, with a token
set, to anyone (the page then asks for the token). Every data path needs the token, compared in constant time.
No answer of the dashboard ever carries a service's token.
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.requests import Request

from queue_service.api.errors import ApiError

NO_TOKEN_REMOTE = (
    "the dashboard is served to loopback clients only while QS_ADMIN_TOKEN is not set; set it to open the "
    "dashboard to others (they send Authorization: Bearer <token>)"
)


def is_loopback(request: Request) -> bool:
    # uvicorn rewrites the client address from X-Forwarded-For only for proxies it trusts (127.0.0.1 by
    # default), so a forwarded remote client is not taken for a local one.
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def check_page(request: Request, admin_token: str) -> None:
    """The page and assets: anyone when a token guards the data, else loopback only (403)."""
    if not admin_token and not is_loopback(request):
        raise ApiError(403, NO_TOKEN_REMOTE)


def check_data(request: Request, admin_token: str) -> None:
    """The data: the admin token (401 without it, or with a wrong one), or a loopback client when none is set."""
    if not admin_token:
        check_page(request, admin_token)
        return
    given = bearer(request)
    if not given or not hmac.compare_digest(given.encode(), admin_token.encode()):
        raise ApiError(
            401, "the dashboard needs Authorization: Bearer <QS_ADMIN_TOKEN>", {"WWW-Authenticate": "Bearer"}
        )
