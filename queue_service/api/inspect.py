"""Looking at a queue without changing it: attributes, where an item stands (search), a request's status.

`readiness` is the one judgement of whether a service can serve (attributes, /readyz and the CLI agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from queue_service.api.errors import ApiError
from queue_service.api.preamble import QueueCall, identity
from queue_service.api.watch import GROUP_IDLE_MS
from queue_service.config import ServiceConfig
from queue_service.protocol import GID_HEADER, PRIORITY_HEADER, PROTOBUF_MEDIA_TYPE, UID_HEADER
from queue_service.store import keys
from queue_service.store.keys import WORKER_GROUP
from queue_service.store.model import ConsumerRow, QueueState, ended_state
from queue_service.store.queues import QueueStore, RequestState
from queue_service.wire import encode_attributes, wants_protobuf

# What `meta.backend` says (the Go client lists it among the keys a queue service must provide).
BACKEND = "redis"


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether a service can serve now, and if not, why (each reason one short phrase)."""

    reasons: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return not self.reasons

    @property
    def state(self) -> str:
        """The platform's `meta.state`: Normal, or what stops the service."""
        if "no live worker" in self.reasons:
            return "NoWorker"
        if any(reason.startswith("sink full") for reason in self.reasons):
            return "SinkFull"
        return "Normal"


def readiness(service: ServiceConfig, inputs: QueueState, sink: QueueState) -> Readiness:
    reasons = []
    if inputs.live_workers == 0:
        reasons.append("no live worker")
    sink_bound = service.queue.sink
    if sink.used >= sink_bound.max_length:
        reasons.append(f"sink full ({sink.used} of {sink_bound.max_length} results): workers take no input")
    elif sink.bytes >= sink_bound.max_bytes:
        reasons.append(f"sink full ({sink.bytes} of {sink_bound.max_bytes} bytes): workers take no input")
    return Readiness(tuple(reasons))


async def service_readiness(store: QueueStore, service: ServiceConfig) -> Readiness:
    inputs = await store.state(keys.input_queue(service.name))
    sink = await store.state(keys.sink_queue(service.name))
    return readiness(service, inputs, sink)


async def attributes(request: Request, call: QueueCall) -> Response:
    """The queue's attributes, as the platform names them (all values are strings)."""
    store, service = call.app.store, call.service
    state = await store.state(call.qk)
    other = await store.state(
        keys.sink_queue(service.name) if call.queue == "input" else keys.input_queue(service.name)
    )
    inputs, sink = (state, other) if call.queue == "input" else (other, state)
    verdict = readiness(service, inputs, sink)
    workers = state.live_workers
    bound = service.rpc.max_queue_size if call.queue == "input" else service.queue.sink.max_length
    consumers = await store.consumers(call.qk)
    connected = str(consumers.connected)
    attrs = {
        "meta.name": service.name if call.queue == "input" else f"{service.name}/sink",
        "meta.backend": BACKEND,
        "meta.state": verdict.state,
        "meta.maxPayloadBytes": str(service.max_payload_bytes),
        "meta.header.user": UID_HEADER,
        "meta.header.group": GID_HEADER,
        "meta.header.priority": PRIORITY_HEADER,
        "stream.length": str(state.length),
        "stream.approxMaxLength": str(bound),
        "stream.firstEntry": str(state.first_index),
        "stream.lastEntry": str(state.last_index),
        "stream.lastIndex": str(state.last_given),
        # The platform's docs name it `stats`, the Go client `status`: both, the same count.
        "consumers.stats.total": connected,
        "consumers.status.total": connected,
        "groups.list": ",".join(consumers.groups),
    }
    attrs |= {f"consumers.list.[{i}]": consumer_row(row) for i, row in enumerate(consumers.rows)}
    end = await store.end_of_stream(call.qk)
    if end is not None:
        attrs["stream.eos"] = str(end.index)
    if call.queue == "input":
        attrs |= {
            "stream.waiting": str(state.waiting),
            "stream.inFlight": str(state.in_flight),
            "workers.live": str(workers),
            # The autoscaling signal: backlog per live worker (all of it when none serve).
            "workers.backlogPerWorker": f"{state.backlog_per_worker:.2f}" if workers else str(state.waiting),
        }
    else:
        attrs |= {"stream.bytes": str(state.bytes), "stream.maxBytes": str(service.queue.sink.max_bytes)}
    if call.queue == "input" and service.webhook is not None:
        hooks = await store.webhook_counts(service.name)
        attrs |= {"webhooks.queued": str(hooks.queued), "webhooks.scheduled": str(hooks.scheduled)}
        attrs["webhooks.dead"] = str(hooks.dead)
    if verdict.reasons:
        attrs["meta.reason"] = "; ".join(verdict.reasons)
    if wants_protobuf(request.headers.get("accept")):
        return Response(encode_attributes(attrs), media_type=PROTOBUF_MEDIA_TYPE)
    return JSONResponse(attrs)


def consumer_row(row: ConsumerRow) -> str:
    """One `consumers.list.[i]` value, in the platform's form (`Id: group.consumer, Index: …, Pending: …`)."""
    consumer = row.consumer
    window = consumer.window
    fields = [
        f"Id: {consumer.name}",
        f"Index: {row.delivered_index}",
        f"Pending: {row.pending}",
        f"Status: {consumer_status(row)}",
        f"Idle: {row.idle_ms / 1000:.3f}s",
        f"Window: {window}",
        f"Slots: {max(0, window - row.pending) if row.connected else 0}",
        f"AutoCommit: {'true' if consumer.auto_commit else 'false'}",
    ]
    if consumer.tags:
        fields.append("Tags: " + ",".join(f"{k}={v}" for k, v in sorted(consumer.tags.items())))
    return ", ".join(fields)


def consumer_status(row: ConsumerRow) -> str:
    """The platform's consumer states: Running (connected); gone with nothing held, Complete; gone holding items,
    Leaving until its group may be replaced (15 s, the held items go to another consumer meanwhile), then Exit."""
    if row.connected:
        return "Running"
    if row.pending == 0:
        return "Complete"
    return "Leaving" if row.idle_ms < GROUP_IDLE_MS else "Exit"


async def search(request: Request, call: QueueCall) -> Response:
    index = call.params.integer("_index_", 0, minimum=1)
    # The input queue's position is the workers'; the sink's is that of the caller's group.
    group = WORKER_GROUP if call.queue == "input" else identity(request)[0]
    position = await call.app.store.search(call.qk, index, group)
    if position is None:
        raise ApiError(404, "no data in stream")
    body: dict[str, object] = {
        "ConsumerId": position.consumer_id,
        "IsPending": position.is_pending,
        "WaitCount": position.wait_count,
    }
    if call.queue == "input" and position.is_pending:
        progress = await _progress_at(call, index)
        if progress is not None:
            body["Progress"] = progress  # ours: what the processor last reported (workers/context.py)
    return JSONResponse(body)


async def _progress_at(call: QueueCall, index: int) -> dict[str, object] | None:
    request_id = await call.app.store.request_id_at(call.qk, index)
    return await call.app.store.progress(call.service.name, request_id) if request_id else None


async def status(request: Request, call: QueueCall) -> Response:
    """What one request is doing, in one Redis round trip: queued, running, finished (and whether it was read)."""
    request_id = request.query_params.get("requestId", "")
    if not request_id:
        raise ApiError(400, "_status_=true needs requestId: the id a put answered with")
    found = await call.app.store.status(call.service.name, request_id)
    if found is None:
        raise ApiError(404, f"request id {request_id!r} is unknown to service {call.service.name!r} (or expired)")
    # One round trip: status.lua reads the request's last progress report too (workers/context.py).
    return JSONResponse(status_body(request_id, found))


def status_body(request_id: str, found: RequestState) -> dict[str, object]:
    """queued (position), running (deliveries, progress), or how it ended: succeeded, failed, cancelled,
    expired; timestamps in ms (acceptedAt, startedAt, finishedAt; deadline while it waits), webhook deliveries."""
    body: dict[str, object] = {"requestId": request_id}
    if found.state in ("queued", "running"):
        body |= {"state": found.state, "index": found.index, "acceptedAt": found.put_ms}
        if found.deadline_ms:
            body["deadline"] = found.deadline_ms
        if found.state == "queued":
            body["position"] = found.ahead
        else:
            body["deliveries"] = found.deliveries
            if found.started_ms:
                body["startedAt"] = found.started_ms
            if found.progress is not None:
                body["progress"] = found.progress
    else:
        body |= {"state": ended_state(found.status, found.ending), "statusCode": found.status}
        if found.status != 200:
            body["lastCode"] = str(found.status)
        if found.state == "done":
            body |= {"result": "in_sink", "resultIndex": found.index}
            body |= {name: ms for name, ms in (("acceptedAt", found.put_ms), ("startedAt", found.started_ms)) if ms}
            body["finishedAt"] = found.finished_ms
            if found.message:
                body["message"] = found.message
        else:
            body |= {"result": "removed", "removedAt": found.removed_ms}
    if found.webhooks:
        body["webhooks"] = found.webhooks
    return body
