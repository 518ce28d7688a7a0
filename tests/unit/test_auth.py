"""Token checks: raw, Bearer and signed tokens open their own service only, with a reason for each refusal."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import textwrap
import time
from email.utils import formatdate

import pytest
from starlette.datastructures import Headers

from queue_service.api.auth import check_authorization

TOKEN = "s3cret-token"
PATH = "/api/predict/echo/sync"
BODY = b"\x00\xffnot utf-8"
NOW = 1_700_000_000.0


def http_date(at: float) -> str:
    return formatdate(at, usegmt=True)  # '%a, %d %b %Y %H:%M:%S GMT', as the client sends


def signed_headers(
    token: str = TOKEN,
    *,
    path: str = PATH,
    body: bytes = BODY,
    date: str | None = None,
    content_type: str = "application/octet-stream",
) -> dict[str, str]:
    """The client's formula (eas_prediction's generate_singaure), written out independently of ours."""
    date = http_date(NOW) if date is None else date
    to_sign = f"POST\n{hashlib.md5(body).hexdigest()}\n{content_type}\n{date}\n{path}".strip()
    signature = base64.b64encode(hmac.new(token.encode(), to_sign.encode(), hashlib.sha1).digest()).decode()
    return {"Authorization": f"EAS {signature}", "Date": date, "Content-Type": content_type}


def check(headers: dict[str, str], *, path: str = PATH, body: bytes = BODY, token: str | None = TOKEN) -> str | None:
    return check_authorization(token, headers, method="POST", path=path, body=body, now=NOW)


def refusal(headers: dict[str, str], *, path: str = PATH, body: bytes = BODY) -> str:
    reason = check(headers, path=path, body=body)
    assert reason is not None, "expected a refusal"
    return reason


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": TOKEN},
        {"authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}"},
        {"Authorization": f"bearer  {TOKEN}"},
        signed_headers(),
        signed_headers(content_type="application/json"),
    ],
    ids=["raw", "raw-lowercase-header", "bearer", "bearer-lowercase", "signed", "signed-json"],
)
def test_each_token_form_opens_the_service(headers: dict[str, str]) -> None:
    assert check(headers) is None


def test_signed_without_content_type_means_octet_stream() -> None:
    headers = signed_headers()
    del headers["Content-Type"]

    assert check(headers) is None


def test_missing_or_empty_header_is_refused() -> None:
    assert check({}) == "missing Authorization header"
    assert check({"Authorization": "  "}) == "missing Authorization header"


@pytest.mark.parametrize("value", ["other-token", "Bearer other-token", "Bearer", f"{TOKEN}x", "Basic abc"])
def test_wrong_token_is_refused(value: str) -> None:
    assert check({"Authorization": value}) == "wrong token"


def test_signature_with_another_token_is_refused() -> None:
    assert refusal(signed_headers("other-token")).startswith("wrong signature")


def test_signature_over_another_body_is_refused() -> None:
    assert refusal(signed_headers(body=b"the body that was signed")).startswith("wrong signature")


def test_signature_for_another_service_does_not_open_this_one() -> None:
    headers = signed_headers(path="/api/predict/other/sync")

    assert check(headers, path="/api/predict/other/sync") is None
    assert refusal(headers).startswith("wrong signature")


def test_signature_with_changed_content_type_is_refused() -> None:
    headers = signed_headers()
    headers["Content-Type"] = "application/json"

    assert refusal(headers).startswith("wrong signature")


def test_stale_or_future_date_is_refused() -> None:
    assert refusal(signed_headers(date=http_date(NOW - 3600))).startswith(
        "signature Date is 3600 s away from server time"
    )
    assert refusal(signed_headers(date=http_date(NOW + 901))).startswith("signature Date is 901 s away")
    assert check(signed_headers(date=http_date(NOW - 899))) is None


@pytest.mark.parametrize("date", ["yesterday", "", "Mon, 99 Foo 2023 25:61:61 GMT"])
def test_garbage_date_is_refused(date: str) -> None:
    assert check(signed_headers(date=date)) == "signature Date header missing or unparseable"


def test_signed_form_without_date_is_refused() -> None:
    headers = signed_headers()
    del headers["Date"]

    assert check(headers) == "signature Date header missing or unparseable"


@pytest.mark.parametrize("token", [None, ""])
def test_open_service_accepts_anything(token: str | None) -> None:
    assert check({}, token=token) is None
    assert check({"Authorization": "whatever"}, token=token) is None
    assert check(signed_headers("x", date="garbage"), token=token) is None


def test_starlette_headers_are_read_case_insensitively() -> None:
    headers = Headers(raw=[(k.lower().encode(), v.encode()) for k, v in signed_headers().items()])

    assert check_authorization(TOKEN, headers, method="POST", path=PATH, body=BODY, now=NOW) is None


def test_non_ascii_tokens_compare_without_error() -> None:
    assert check({"Authorization": "jeton-é"}, token="jeton-é") is None
    assert check({"Authorization": "jeton-è"}, token="jeton-é") == "wrong token"


# Runs in the official client's venv: its own generate_singaure signs, we verify.
_OFFICIAL_SIDE = textwrap.dedent(
    """
    import json, sys
    from eas_prediction import PredictClient

    client = PredictClient("http://127.0.0.1:1", "echo/sync")
    client.set_token(sys.argv[1])
    default = client.generate_singaure(bytearray(b"\\x00\\xffnot utf-8"))
    client.set_content_type("application/json")
    json_body = client.generate_singaure(bytearray(b'{"x": 1}'))
    json.dump({"default": default, "json": json_body}, sys.stdout)
    """
)


def test_official_client_signature_is_accepted(eas_python: str) -> None:
    python = eas_python
    # The client formats local time as GMT: it signs correctly only on a UTC machine.
    env = {**os.environ, "TZ": "UTC"}

    run = subprocess.run([python, "-c", _OFFICIAL_SIDE, TOKEN], capture_output=True, text=True, timeout=60, env=env)

    assert run.returncode == 0, run.stderr
    signed = json.loads(run.stdout)
    now = time.time()
    for headers, body in ((signed["default"], BODY), (signed["json"], b'{"x": 1}')):
        assert headers["Authorization"].startswith("EAS ")
        assert check_authorization(TOKEN, headers, method="POST", path=PATH, body=body, now=now) is None
        assert check_authorization(TOKEN, headers, method="POST", path="/api/predict/echo", body=body, now=now)
        assert check_authorization("other", headers, method="POST", path=PATH, body=body, now=now)
