"""The OpenAPI description of the queue operations (they are plain Starlette routes, so it is written here).

Each operation of the platform's protocol with its query parameters, body, auth scheme and real status
codes; merged into FastAPI's own schema, served at /openapi.json and shown at /docs.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from queue_service.protocol import (
    GID_HEADER,
    PRIORITY_HEADER,
    PRIORITY_PARAMETER,
    PROTOBUF_MEDIA_TYPE,
    REQUEST_ID_HEADER,
    UID_HEADER,
)

ERROR = {"$ref": "#/components/schemas/Error"}
STATUS_TEXT = {
    "400": "malformed request (a bad or unknown parameter, a reserved tag, a bad consumer header)",
    "401": "token missing or wrong",
    "404": "no such service",
    "408": "the body did not arrive in time (or, sync: metadata.rpc.keepalive passed)",
    "413": "body over queue.max_payload_size_kb",
    "429": "over metadata.rpc.rate_limit, or too many open long polls (Retry-After)",
    "450": "the queue is full (metadata.rpc.max_queue_size waiting, or the sink's bounds)",
    "503": "Redis unreachable (sync: no live worker)",
}


def _param(name: str, description: str, schema: dict[str, Any] | None = None, where: str = "query") -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


INDEX = _param(
    "_index_",
    "index to start from (0: the head); with _search_ or _trunc_, the item's index",
    {"type": "integer", "minimum": 0},
)
IDENTITY = [
    _param(GID_HEADER, "consumer group (default `eas`); names starting with `qs-` are reserved", where="header"),
    _param(UID_HEADER, "consumer id within the group", where="header"),
]
GET_PARAMS = [
    INDEX,
    _param(
        "_length_", "most items to answer (1-10000); the answer also stops at QS_MAX_ANSWER_BYTES", {"type": "integer"}
    ),
    _param("_timeout_", "long poll: wait up to this long (Go duration, e.g. `5s`) for an item to appear"),
    _param("requestId", "the item of this request id (the result of a put, in the sink)"),
    _param("_raw_", "answer the bare bytes of one item", {"type": "boolean"}),
    _param("_auto_delete_", "delete what is answered, once the answer is written", {"type": "boolean"}),
    _param("_attrs_", "answer the queue's attributes instead", {"type": "boolean"}),
    _param("_search_", "answer where item _index_ stands: {ConsumerId, IsPending, WaitCount}", {"type": "boolean"}),
    _param("_status_", "answer the state of request `requestId`", {"type": "boolean"}),
    _param(
        "_stream_",
        "sink: answer what request `requestId` streams, as Server-Sent Events (progress, chunk, restart, done)",
        {"type": "boolean"},
    ),
    _param("_count_", "answer how many items the queue holds (a plain integer; with _priority_: priority ones)"),
    _param(
        "_watch_",
        "stream items to a consumer of the group: a WebSocket upgrade (one frame per item), or over plain HTTP "
        "a stream of DataFrameProto, each after its 4-byte big-endian length; with _window_, _index_only_, "
        "_auto_commit_",
        {"type": "boolean"},
    ),
    *IDENTITY,
]
PRIORITY = [
    _param(PRIORITY_PARAMETER, "`true`, `1` or any level above 0: ahead of normal items"),
    _param(PRIORITY_HEADER, "the same, as a header (what `meta.header.priority` names)", where="header"),
]


def _responses(ok: str, content: dict[str, Any], *codes: str) -> dict[str, Any]:
    answers: dict[str, Any] = {"200": {"description": ok, "content": content}}
    for code in codes:
        answers[code] = {"description": STATUS_TEXT[code], "content": {"application/json": {"schema": ERROR}}}
    return answers


def _queue_operations(queue: str) -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    frames = {
        "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/DataFrame"}}},
        PROTOBUF_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    }
    put_responses = _responses(
        "the item's index; its request id in the header", text, "400", "401", "404", "408", "413", "429", "450", "503"
    )
    put_responses["200"]["headers"] = {REQUEST_ID_HEADER: {"schema": {"type": "string"}}}
    get_responses = _responses(
        "the items (JSON, protobuf with Accept, or raw bytes with _raw_)", frames, "400", "401", "404", "429", "503"
    )
    get_responses["204"] = {
        "description": "nothing there (after the long poll's wait); a protobuf Accept gets 200 and an empty list"
    }
    ok = _responses("OK", text, "400", "401", "404", "503")
    tag = ["input queue" if queue == "input" else "sink"]
    return {
        "post": {
            "tags": tag,
            "summary": "put an item" if queue == "input" else "put a result",
            "description": "Query parameters not starting with `_` become the item's tags "
            "(`requestId` and `lastCode` are reserved). `_eos_=true` (no body) ends the queue's stream instead: "
            "the answer is the last index before the end, puts are refused (400) until a truncate past it, and "
            "watchers get a last frame tagged `_eos_` once nothing put before the end is left; `_force_=true` "
            "also removes what is left.",
            "parameters": [
                *PRIORITY,
                _param("_eos_", "end the stream", {"type": "boolean"}),
                _param("_force_", "with _eos_: remove what is left", {"type": "boolean"}),
            ],
            "requestBody": {
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
            },
            "responses": put_responses,
        },
        "get": {
            "tags": tag,
            "summary": "get items, attributes, search, status; WebSocket watch",
            "parameters": GET_PARAMS,
            "responses": get_responses,
        },
        "delete": {
            "tags": tag,
            "summary": "delete items (_indexes_), or truncate below _index_ (_trunc_=true)",
            "parameters": [
                _param("_indexes_", "comma-separated indexes"),
                INDEX,
                _param("_trunc_", "truncate", {"type": "boolean"}),
                *IDENTITY,
            ],
            "responses": ok,
        },
        "put": {
            "tags": tag,
            "summary": "commit items: they are gone from the queue; or refuse them (_negative_=true)",
            "description": "A negative commit (form body `_code_=...&_reason_=...`) gives the items back to the "
            "caller's group; an item the group was delivered queue.max_delivery times ends instead (an input "
            "item with a terminal result carrying lastCode and `<code>: <reason>`).",
            "parameters": [
                _param("_indexes_", "comma-separated indexes"),
                _param("_negative_", "refuse the items instead", {"type": "boolean"}),
                *IDENTITY,
            ],
            "requestBody": {"content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}}},
            "responses": ok,
        },
    }


def queue_paths() -> dict[str, Any]:
    sync_responses = _responses(
        "the processor's answer, with its status",
        {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "400",
        "401",
        "404",
        "408",
        "413",
        "429",
        "450",
        "503",
    )
    body = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    sub_path = _param("sub_path", "passed on to the processor (RequestContext.path)", where="path")
    sub_path["required"] = True
    put = _queue_operations("input")["post"]
    return {
        "/api/predict/{service_name}/{sub_path}": {
            "post": {
                **put,
                "summary": "put an item with a sub-path",
                "parameters": [sub_path, *PRIORITY],
                "requestBody": body,
            }
        },
        "/api/predict/{service_name}/sync/{sub_path}": {
            "post": {
                "tags": ["sync"],
                "summary": "a synchronous request with a sub-path",
                "parameters": [sub_path],
                "requestBody": body,
                "responses": sync_responses,
            }
        },
        "/api/predict/{service_name}": _queue_operations("input"),
        "/api/predict/{service_name}/sink": _queue_operations("sink"),
        "/api/predict/{service_name}/sync": {
            "post": {
                "tags": ["sync"],
                "summary": "a synchronous request through the same bounded queue",
                "requestBody": {
                    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
                },
                "responses": sync_responses,
            }
        },
    }


SCHEMAS = {
    "Error": {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]},
    "DataFrame": {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "tags": {"type": "object", "additionalProperties": {"type": "string"}},
            "data": {"type": "string", "format": "byte"},
            "message": {"type": "string"},
        },
    },
}


def install(app: FastAPI) -> None:
    def schema() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        service = _param("service_name", "the service", where="path")
        service["required"] = True
        for path, operations in queue_paths().items():
            for operation in operations.values():
                operation["parameters"] = [service, *operation.get("parameters", [])]
                operation["security"] = [{"token": []}]
            spec.setdefault("paths", {})[path] = operations
        spec["paths"]["/api/v1/servicediscovery/upstreams/{service_name}"] = {
            "get": {
                "tags": ["discovery"],
                "summary": "the API processes serving the service, for the clients' direct mode (no token)",
                "parameters": [service],
                "responses": {"200": {"description": '{"endpoints": {"items": [{"ip", "port", "weight"}]}}'}},
            }
        }
        components = spec.setdefault("components", {})
        components.setdefault("schemas", {}).update(SCHEMAS)
        components["securitySchemes"] = {
            "token": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "the service's token: raw, `Bearer <token>`, or the SDK's signed `EAS <hmac>` form",
            }
        }
        app.openapi_schema = spec
        return spec

    app.openapi = schema  # type: ignore[method-assign]
