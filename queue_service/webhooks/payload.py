"""The JSON body of a delivery, from the facts its causing step wrote (store/lua: finish, take, remove, expire).

`{"type": "request.<event>", "timestamp": ..., "data": {...}}`, the envelope Standard Webhooks suggests. The
result is in `data` up to the service's `webhook.max_result_bytes` (as text, or base64 when it is not UTF-8);
a larger one only as `resultUrl`, the sink read that fetches it.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from queue_service.store.model import Delivery, ended_state


def _int(delivery: Delivery, name: str) -> int:
    try:
        return int(float(delivery.text(name, "0") or 0))
    except ValueError:
        return 0


def _iso(ms: int) -> str | None:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z") if ms else None


def result_path(service: str, request_id: str) -> str:
    return f"/api/predict/{quote(service, safe='')}/sink?requestId={quote(request_id, safe='')}&_raw_=true"


def render(delivery: Delivery, *, public_url: str = "") -> str:
    """The body of one delivery, the same on every attempt."""
    event = delivery.event
    data: dict[str, Any] = {
        "service": delivery.service,
        "requestId": delivery.request_id,
        "index": _int(delivery, "index"),
    }
    timings: dict[str, Any] = {"acceptedAt": _iso(_int(delivery, "put"))}
    if event == "start":
        data["state"] = "running"
        data["deliveries"] = _int(delivery, "deliveries")
        timings["startedAt"] = _iso(_int(delivery, "ts"))
    elif event == "completed":
        status = _int(delivery, "code") or 200
        data["state"] = ended_state(status, delivery.text("end"))
        data["statusCode"] = status
        if status != 200:
            data["lastCode"] = str(status)
        if delivery.text("message"):
            data["message"] = delivery.text("message")
        data["tags"] = json.loads(delivery.text("tags", "{}") or "{}")
        data["deliveries"] = _int(delivery, "deliveries")
        timings |= {"startedAt": _iso(_int(delivery, "start")), "finishedAt": _iso(_int(delivery, "ts"))}
        for name, field in (("queueWaitSeconds", "wait"), ("processingSeconds", "proc")):
            if delivery.text(field):
                timings[name] = round(float(delivery.text(field)), 6)
        _add_result(data, delivery, public_url)
    else:  # progress, output: the facts their step wrote, as they are
        data |= {
            name: delivery.text(name)
            for name in delivery.fields
            if name not in {"event", "target", "url", "rid", "ts", "index", "put", "wid"}
        }
    data["timings"] = {name: value for name, value in timings.items() if value is not None}
    envelope = {"type": f"request.{event}", "timestamp": _iso(_int(delivery, "ts")), "data": data}
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))


def _add_result(data: dict[str, Any], delivery: Delivery, public_url: str) -> None:
    size = _int(delivery, "size")
    data["resultSize"] = size
    if delivery.text("rtype"):
        data["resultType"] = delivery.text("rtype")
    if _int(delivery, "sink"):
        data["resultIndex"] = _int(delivery, "sink")
    raw = delivery.fields.get("data")
    if raw is not None:
        try:
            data["result"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            data["resultBase64"] = base64.b64encode(raw).decode("ascii")
    elif size:
        data["resultUrl"] = public_url.rstrip("/") + result_path(delivery.service, delivery.request_id)
