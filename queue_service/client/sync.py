"""`Client`: the queue API of one service over httpx, synchronously (see the package's docstring)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Generator, Iterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import httpx
from httpx_sse import connect_sse

from queue_service.client import calls
from queue_service.client.errors import RequestFailed, Unreachable, raise_for
from queue_service.client.retrying import RetryPolicy
from queue_service.client.types import Done, Result, Status, StreamEvent, Submitted
from queue_service.protocol import DEFAULT_GROUP, GID_HEADER, UID_HEADER

Body = bytes | str | dict[str, Any] | list[Any]


def encode_body(data: Body, content_type: str | None) -> tuple[bytes, str | None]:
    """bytes as they are, str as UTF-8, dict and list as JSON (with its Content-Type unless one is given)."""
    if isinstance(data, bytes):
        return data, content_type
    if isinstance(data, str):
        return data.encode(), content_type
    return json.dumps(data).encode(), content_type or "application/json"


def websocket_url(base_url: str, service: str, sink: bool, params: Mapping[str, str]) -> str:
    return "ws" + base_url.rstrip("/").removeprefix("http") + calls.queue_path(service, sink) + "?" + urlencode(params)


def watch_params(window: int, start_index: int, tags: Mapping[str, str] | None) -> dict[str, str]:
    return {"_watch_": "true", "_window_": str(window), "_index_": str(start_index), "_auto_commit_": "false"} | dict(
        tags or {}
    )


def frame_result(frame: Any) -> Result:
    return Result(
        frame.tags.get("requestId", ""), frame.index, frame.data, int(frame.tags.get("lastCode") or 200), frame.tags
    )


class Client:
    """One service of one deployment. Every call raises a `ClientError` subclass when it does not succeed."""

    def __init__(
        self,
        url: str,
        service: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.service = service
        self.token = token
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        headers = {"Authorization": token} if token else {}
        self.http = http or httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, call: calls.Call, *, accept: tuple[int, ...] = ()) -> httpx.Response:
        """One call, retried by the policy on 429, 450, 503 and lost connections; `accept`: error statuses
        returned rather than raised."""
        for attempt in self.retry.sync():
            with attempt:
                response = self._send_once(call)
                if response.status_code not in accept:
                    raise_for(response)
        return response

    def _send_once(self, call: calls.Call) -> httpx.Response:
        try:
            return self.http.request(
                call.method,
                call.path,
                params=call.params,
                headers=call.headers,
                content=call.content,
                timeout=call.timeout(self.timeout),
            )
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot connect to {self.url}: {exc or type(exc).__name__}") from exc

    # --- requests -----------------------------------------------------------------------

    def put(
        self,
        data: Body,
        *,
        tags: Mapping[str, str] | None = None,
        priority: bool = False,
        webhook: str | None = None,
        webhook_events: list[str] | None = None,
        ttl: float | str | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
        content_type: str | None = None,
    ) -> Submitted:
        """Put a request; with `wait`, the server holds the answer up to that many seconds for the result
        (`Submitted.result`, None if it was not done by then)."""
        body, content_type = encode_body(data, content_type)
        call = calls.put(
            self.service,
            body,
            tags=tags,
            priority=priority,
            webhook=webhook,
            webhook_events=webhook_events,
            ttl=ttl,
            idempotency_key=idempotency_key,
            wait=wait,
            content_type=content_type,
        )
        return calls.submitted(self.send(call))

    def result(self, request_id: str, *, wait: float = 0.0, delete: bool = False) -> Result | None:
        """The request's result, waiting up to `wait` seconds for it (long polls); None when not there by then.
        `delete=True` removes it from the sink as it is read (results stay there otherwise, within its bounds)."""
        deadline = time.monotonic() + wait
        while True:
            left = max(0.0, deadline - time.monotonic())
            found = calls.result_of(self.send(calls.result(self.service, request_id, left, not delete)), request_id)
            if found is not None or time.monotonic() >= deadline:
                return found

    def status(self, request_id: str) -> Status:
        """What the request is doing now (one call); NotFound for an unknown request id."""
        return calls.status_of(self.send(calls.status(self.service, request_id)))

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request (a running one's processor is stopped); False when it had ended."""
        found = self.status(request_id)
        if found.state not in ("queued", "running") or found.index is None:
            return False
        self.send(calls.delete(self.service, found.index))
        return True

    def stream(self, request_id: str, *, read_timeout: float | None = None) -> Iterator[StreamEvent]:
        """Progress and chunks of a request as they come, then `Done` (SSE; reconnects with Last-Event-ID).

        The API sends a keep-alive every few seconds: `read_timeout` (seconds) ends a stream whose connection
        went silent for that long (Unreachable, retried like a broken connection); None waits forever."""
        call = calls.stream(self.service, request_id)
        last_id = ""
        for attempt in self.retry.sync():
            with attempt:
                headers = {"Last-Event-ID": last_id} if last_id else {}
                try:
                    with connect_sse(
                        self.http,
                        "GET",
                        call.path,
                        params=call.params,
                        headers=headers,
                        timeout=httpx.Timeout(self.timeout, read=read_timeout),
                    ) as source:
                        if source.response.status_code >= 400:
                            source.response.read()
                            raise_for(source.response)
                        for sse in source.iter_sse():
                            last_id = sse.id or last_id
                            event = calls.stream_event(sse)
                            if event is not None:
                                yield event
                            if isinstance(event, Done):
                                return
                except httpx.TransportError as exc:
                    raise Unreachable(f"stream of {request_id} broke: {exc}") from exc
                raise Unreachable(f"stream of {request_id} ended before its done event")

    def watch(
        self,
        *,
        group: str = DEFAULT_GROUP,
        window: int = 10,
        start_index: int = 0,
        tags: Mapping[str, str] | None = None,
        sink: bool = True,
        commit: bool = True,
    ) -> Generator[Result, None, None]:
        """Results as they come (a WebSocket watch of the sink in consumer group `group`); each one is committed
        (gone from the sink) when the loop asks for the next, so a result the caller did not finish with stays
        (`commit=False`: the caller commits, `commit(index)`)."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        from queue_service.wire import decode_frame

        url = websocket_url(self.url, self.service, sink, watch_params(window, start_index, tags))
        headers = {GID_HEADER: group, UID_HEADER: f"py-{uuid.uuid4().hex[:12]}"}
        if self.token:
            headers["Authorization"] = self.token
        try:
            with connect(url, additional_headers=headers, max_size=None) as socket:
                while True:
                    message = socket.recv()
                    frame = decode_frame(message if isinstance(message, bytes) else message.encode())
                    yield frame_result(frame)
                    if commit:
                        self.send(calls.commit(self.service, frame.index, sink))
        except InvalidStatus as exc:
            body = exc.response.body.decode(errors="replace") if exc.response.body else ""
            raise RequestFailed(exc.response.status_code, body) from None
        except (OSError, InvalidHandshake) as exc:
            raise Unreachable(f"cannot connect to {self.url}: {exc}") from exc
        except ConnectionClosed as exc:
            raise Unreachable(f"the API closed the watch: {exc}") from exc

    # --- the queue ----------------------------------------------------------------------

    def attributes(self, *, sink: bool = False) -> dict[str, str]:
        found: dict[str, str] = self.send(calls.attributes(self.service, sink)).json()
        return found

    def commit(self, index: int, *, sink: bool = True) -> None:
        self.send(calls.commit(self.service, index, sink))
