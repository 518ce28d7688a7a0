"""What the dashboard's data paths answer, built from the store's reads (nothing here talks to Redis itself).

`overview`: per service its queue state (the numbers attributes report, from the same reads), readiness, the
workers' cumulative latency counters (the page turns their deltas into throughput and latency), and the answer
counts of the last minutes; and every worker with what it holds. `failures`: failed results still in the sinks.
`request`: one request's state and timeline, with a preview of its result.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from queue_service.api.context import App
from queue_service.api.dashboard.answers import MINUTES_SHOWN, current_minute
from queue_service.api.inspect import readiness, status_body
from queue_service.config import ServiceConfig
from queue_service.store import keys
from queue_service.store.model import Holding
from queue_service.timings import HISTOGRAMS, bucket_bounds

# Most bytes of a result shown in the page (the link reads it whole, with the service's token).
PREVIEW_BYTES = 4096
FAILURES_SCANNED = 500
FAILURES_SHOWN = 50


def _histogram(counters: Mapping[str, float], name: str) -> dict[str, Any]:
    buckets = {str(bound): counters.get(f"{name}:{bound}", 0.0) for bound in bucket_bounds()}
    buckets["+Inf"] = counters.get(f"{name}:+Inf", 0.0)
    return {"count": sum(buckets.values()), "sum": counters.get(f"{name}:sum", 0.0), "buckets": buckets}


async def _running(app: App, service: str) -> dict[tuple[str, int], dict[str, Any]]:
    """What workers report they are on (their lease keepers publish it each second): (worker, index) -> entry."""
    return {
        (item.worker, item.index): {"startedAt": item.started_at_ms, "deliveries": item.deliveries}
        for item in await app.store.running(service)
    }


def _holding_view(service: str, held: Holding, running: Mapping[tuple[str, int], Mapping[str, Any]]) -> dict:
    reported = running.get((held.worker, held.index))
    view: dict[str, Any] = {
        "service": service,
        "index": held.index,
        "requestId": held.request_id,
        "deliveries": held.deliveries,
        "acceptedAt": held.put_ms,
        "priority": held.priority,
    }
    if reported:
        view["startedAt"] = int(reported.get("startedAt") or 0) or None
        view["deliveries"] = int(reported.get("deliveries") or held.deliveries)
    return view


async def service_view(app: App, service: ServiceConfig, now: float) -> tuple[dict[str, Any], list[Holding]]:
    store, name = app.store, service.name
    inputs = await store.state(keys.input_queue(name))
    sink = await store.state(keys.sink_queue(name))
    counters = await store.timings(name)
    minute = current_minute(now)
    minutes = list(range(minute - MINUTES_SHOWN + 1, minute + 1))
    answers = await store.answers(name, minutes)
    verdict = readiness(service, inputs, sink)
    view = {
        "name": name,
        "state": verdict.state,
        "ready": verdict.ready,
        "reasons": list(verdict.reasons),
        "waiting": inputs.waiting,
        "inFlight": inputs.in_flight,
        "length": inputs.length,
        "maxQueueSize": service.rpc.max_queue_size,
        "oldestAgeSeconds": round(max(0.0, now - inputs.oldest_put), 3) if inputs.oldest_put else None,
        "lastIndex": inputs.last_given,
        "liveWorkers": inputs.live_workers,
        # As the attributes report it: all of the backlog when no worker is live.
        "backlogPerWorker": round(inputs.backlog_per_worker, 2),
        "sink": {
            "length": sink.length,
            "bytes": sink.bytes,
            "maxLength": service.queue.sink.max_length,
            "maxBytes": service.queue.sink.max_bytes,
        },
        "timings": {histogram: _histogram(counters, histogram) for histogram in HISTOGRAMS},
        "answers": [{"minute": m, "counts": counts} for m, counts in zip(minutes, answers, strict=True)],
    }
    return view, await store.holding(name)


async def overview(app: App) -> dict[str, Any]:
    now = time.time()
    services: list[dict[str, Any]] = []
    workers: dict[str, dict[str, Any]] = {}
    for service in app.services.services:
        view, held = await service_view(app, service, now)
        services.append(view)
        running = await _running(app, service.name)
        for name, lapses in (await app.store.workers(service.name)).items():
            worker = workers.setdefault(name, {"name": name, "services": [], "holding": [], "lapsesAt": 0.0})
            worker["services"].append(service.name)
            worker["lapsesAt"] = max(worker["lapsesAt"], lapses)
        for item in held:
            # A holder with no heartbeat at all (dead, its key pruned) still holds until its lease lapses.
            worker = workers.setdefault(
                item.worker, {"name": item.worker, "services": [service.name], "holding": [], "lapsesAt": 0.0}
            )
            worker["holding"].append(_holding_view(service.name, item, running))
    for worker in workers.values():
        worker["live"] = worker["lapsesAt"] > now
        worker["lapsesAt"] = int(worker["lapsesAt"] * 1000)
    ordered = sorted(workers.values(), key=lambda w: (not w["live"], w["name"]))
    return {"now": int(now * 1000), "services": services, "workers": ordered}


async def failures(app: App) -> dict[str, Any]:
    found: list[dict[str, Any]] = []
    scans: dict[str, dict[str, int]] = {}
    for service in app.services.services:
        scan = await app.store.recent_failures(service.name, scan=FAILURES_SCANNED)
        scans[service.name] = {"scanned": scan.scanned, "oldestAt": scan.oldest_ms, "failed": len(scan.failures)}
        found += [
            {
                "service": service.name,
                "index": f.index,
                "requestId": f.request_id,
                "finishedAt": f.finished_ms,
                "status": f.status,
                "message": f.message,
                "size": f.size,
            }
            for f in scan.failures
        ]
    found.sort(key=lambda f: f["finishedAt"], reverse=True)
    return {"failures": found[:FAILURES_SHOWN], "scans": scans}


def _timeline(status: Mapping[str, Any], started_at: int | None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    if status.get("acceptedAt"):
        events.append({"event": "accepted", "at": status["acceptedAt"]})
    deliveries = int(status.get("deliveries") or 0)
    if deliveries:
        # Each delivery is a worker taking the item; one past the first follows a lapsed lease (a worker died).
        events.append({"event": f"taken by a worker (delivery {deliveries})", "at": started_at})
    if status.get("finishedAt"):
        events.append({"event": "finished", "at": status["finishedAt"], "statusCode": status.get("statusCode")})
    if status.get("removedAt"):
        events.append({"event": "result removed", "at": status["removedAt"], "statusCode": status.get("statusCode")})
    return events


def preview(size: int, prefix: bytes) -> dict[str, Any]:
    try:
        text, encoding = prefix.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(prefix).decode(), "base64"
    return {"size": size, "preview": text, "encoding": encoding, "truncated": size > len(prefix)}


async def request(app: App, request_id: str, services: Sequence[ServiceConfig]) -> dict[str, Any] | None:
    """The first service of `services` that knows `request_id`: its status, timeline, worker and result."""
    for service in services:
        found = await app.store.status(service.name, request_id)
        if found is None:
            continue
        status = status_body(request_id, found)
        answer: dict[str, Any] = {"service": service.name, "status": status}
        started_at = None
        if found.state == "running":
            held = [h for h in await app.store.holding(service.name) if h.index == found.index]
            running = await _running(app, service.name)
            if held:
                answer["worker"] = held[0].worker
                started_at = _holding_view(service.name, held[0], running).get("startedAt")
        answer["timeline"] = _timeline(status, started_at)
        if found.state == "done":
            peeked = await app.store.peek_result(service.name, found.index, PREVIEW_BYTES)
            if peeked is not None:
                answer["result"] = preview(*peeked) | {
                    "link": f"/api/predict/{service.name}/sink?" + urlencode({"requestId": request_id, "_raw_": "true"})
                }
        return answer
    return None
