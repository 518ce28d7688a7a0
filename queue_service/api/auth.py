"""Token checks for one service: the raw token, ``Bearer <token>`` and the official SDK's signed form.

The signed form is what ``eas_prediction.PredictClient`` sends::

    Authorization: EAS base64(hmac-sha1(token, "POST\\n<md5hex(body)>\\n<content-type>\\n<Date>\\n<path>"))

The signature covers the method, the body, the content type, the Date header and the request path,
so a signature captured for one service or one body opens nothing else; the Date must lie within
``max_skew_seconds`` of server time, which limits replays. The client formats its *local* time with
a literal "GMT" suffix, so machines that sign requests must run in UTC (or their clock looks skewed
by their UTC offset). The format is the platform's, and its limits are inherent: a captured request
can be replayed within the Date window, and the signature does not cover the query string. Use TLS,
and prefer ``Bearer <token>`` for new clients.

The raw and Bearer forms are checked before the body is read (`check_before_body`): a client without
the token cannot make the server read, or hold memory for, megabytes of body. Only the signed form,
whose signature covers the body, needs the body first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

_DEFAULT_CONTENT_TYPE = "application/octet-stream"  # what the client signs when it sets no Content-Type


def check_authorization(
    expected_token: str | None,
    headers: Mapping[str, str],
    *,
    method: str,
    path: str,
    body: bytes,
    now: float | None = None,
    max_skew_seconds: float = 900,
) -> str | None:
    """None when the request may pass, else a short reason for the 401 body.

    ``expected_token`` None or empty means the service is open. ``path`` is the request path as
    the client signed it, e.g. ``/api/predict/echo``.
    """
    problem, signature = _read_authorization(expected_token, headers)
    if problem or signature is None:
        return problem
    assert expected_token is not None  # a signature is only read for a service with a token
    return _check_signature(
        expected_token,
        signature,
        headers,
        method=method,
        path=path,
        body=body,
        now=time.time() if now is None else now,
        max_skew_seconds=max_skew_seconds,
    )


def check_before_body(expected_token: str | None, headers: Mapping[str, str]) -> str | None:
    """A reason to refuse at once (missing header, wrong raw or Bearer token), else None.

    None also means "signed": that form is checked by `check_authorization` once the body is in.
    """
    return _read_authorization(expected_token, headers)[0]


def _read_authorization(expected_token: str | None, headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(a reason to refuse, or None; the signature still to check against the body, or None)."""
    if not expected_token:
        return None, None
    authorization = (_header(headers, "Authorization") or "").strip()
    if not authorization:
        return "missing Authorization header", None
    if _same(authorization, expected_token):
        return None, None
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return (None if _same(credential.strip(), expected_token) else "wrong token"), None
    if scheme.lower() == "eas":
        return None, credential.strip()
    return "wrong token", None


def sign(token: str, *, method: str, path: str, body: bytes, content_type: str, date: str) -> str:
    """The signature the official client puts after ``EAS `` (its ``generate_singaure``)."""
    content_md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
    string_to_sign = f"{method.upper()}\n{content_md5}\n{content_type}\n{date}\n{path}".strip()
    digest = hmac.new(token.encode("utf-8"), string_to_sign.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _check_signature(
    expected_token: str,
    signature: str,
    headers: Mapping[str, str],
    *,
    method: str,
    path: str,
    body: bytes,
    now: float,
    max_skew_seconds: float,
) -> str | None:
    date = _header(headers, "Date")
    signed_at = _parse_http_date(date)
    if date is None or signed_at is None:
        return "signature Date header missing or unparseable"
    content_type = _header(headers, "Content-Type") or _DEFAULT_CONTENT_TYPE
    expected = sign(expected_token, method=method, path=path, body=body, content_type=content_type, date=date)
    if not _same(signature, expected):
        return "wrong signature (token, body, Content-Type, Date or path differ from what was signed)"
    # Checked after the signature so that only token holders learn about the server's clock.
    skew = signed_at - now
    if abs(skew) > max_skew_seconds:
        return (
            f"signature Date is {abs(skew):.0f} s away from server time "
            f"(limit {max_skew_seconds:.0f} s; the signing machine must run in UTC)"
        )
    return None


def _parse_http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:  # "-0000" in RFC 5322 means UTC with no claim about local time
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Starlette's Headers look up case-insensitively; a plain dict needs the scan.
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


def _same(given: str, expected: str) -> bool:
    # Constant time, on bytes: compare_digest on str refuses non-ASCII text.
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))
