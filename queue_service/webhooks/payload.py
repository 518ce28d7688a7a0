"""The JSON body of a delivery, from the facts its causing step wrote (store/lua: finish, take, remove, expire,
chunks).

`{"type": "request.<event>", "timestamp": ..., "data": {...}}`, the envelope Standard Webhooks suggests. The
result is in `data` up to the service's `webhook.max_result_bytes` (as text, or base64 when it is not UTF-8);
a larger one only as `resultUrl`, the sink read that fetches it. `progress` has the processor's last report;
`output` the output streamed so far (joined as the result will be) up to the same bound, beyond it only
`outputUrl`, the request's stream.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from queue_service.store.model import OCTET_STREAM, TEXT_PLAIN, Delivery, ended_state

# chunks.lua's `okinds` (the encodings of the chunks so far) -> the type the joined output has (as the result
# will: workers/streaming.py's Joined).
_OUTPUT_TYPES = {"t": TEXT_PLAIN, "j": "application/x-ndjson"}


def _int(delivery: Delivery, name: str) -> int:
    try:
        return int(float(delivery.text(name, "0") or 0))
    except ValueError:
        return 0


def _iso(ms: int) -> str | None:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z") if ms else None


def result_path(service: str, request_id: str) -> str:
    return f"/api/predict/{quote(service, safe='')}/sink?requestId={quote(request_id, safe='')}&_raw_=true"


def stream_path(service: str, request_id: str) -> str:
    return f"/api/predict/{quote(service, safe='')}/sink?requestId={quote(request_id, safe='')}&_stream_=true"


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
    elif event in ("progress", "output"):
        data["state"] = "running"
        data["deliveries"] = _int(delivery, "deliveries")
        timings["startedAt"] = _iso(_int(delivery, "start"))
        progress = _progress(delivery)
        if progress is not None:
            data["progress"] = progress
        if event == "output":
            _add_output(data, delivery, public_url)
    else:  # an event of a later version: the facts its step wrote, as they are
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


def _progress(delivery: Delivery) -> dict[str, Any] | None:
    """The processor's last report, `{"fraction", "message"}` (workers/context.py), when there is one."""
    try:
        report = json.loads(delivery.text("progress") or "null")
    except ValueError:
        return None
    if not isinstance(report, dict):
        return None
    return {"fraction": report.get("fraction"), "message": report.get("message", "")}


def _add_output(data: dict[str, Any], delivery: Delivery, public_url: str) -> None:
    data["outputSize"] = _int(delivery, "osize")
    raw = delivery.fields.get("output")
    if raw is None:  # past webhook.max_result_bytes (or no chunk written yet): the stream has it all
        data["outputUrl"] = public_url.rstrip("/") + stream_path(delivery.service, delivery.request_id)
        return
    data["outputType"] = _OUTPUT_TYPES.get(delivery.text("okinds"), OCTET_STREAM)
    try:
        data["output"] = raw.decode("utf-8")
    except UnicodeDecodeError:
        data["outputBase64"] = base64.b64encode(raw).decode("ascii")
