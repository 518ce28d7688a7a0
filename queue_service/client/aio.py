"""`AsyncClient`: the same calls as `Client`, for asyncio (httpx.AsyncClient)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from types import TracebackType

import httpx
from httpx_sse import aconnect_sse

from queue_service.client import calls
from queue_service.client.errors import RequestFailed, Unreachable, raise_for
from queue_service.client.retrying import RetryPolicy
from queue_service.client.sync import Body, encode_body, frame_result, watch_params, websocket_url
from queue_service.client.types import Done, Result, Status, StreamEvent, Submitted
from queue_service.protocol import DEFAULT_GROUP, GID_HEADER, UID_HEADER


class AsyncClient:
    """One service of one deployment, for asyncio. Every call raises a `ClientError` subclass on failure."""

    def __init__(
        self,
        url: str,
        service: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.service = service
        self.token = token
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        headers = {"Authorization": token} if token else {}
        self.http = http or httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def send(self, call: calls.Call, *, accept: tuple[int, ...] = ()) -> httpx.Response:
        async for attempt in self.retry.asynchronous():
            with attempt:
                try:
                    response = await self.http.request(
                        call.method,
                        call.path,
                        params=call.params,
                        headers=call.headers,
                        content=call.content,
                        timeout=call.timeout(self.timeout),
                    )
                except httpx.TransportError as exc:
                    raise Unreachable(f"cannot connect to {self.url}: {exc or type(exc).__name__}") from exc
                if response.status_code not in accept:
                    raise_for(response)
        return response

    async def put(
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
        return calls.submitted(await self.send(call))

    async def result(self, request_id: str, *, wait: float = 0.0, delete: bool = False) -> Result | None:
        deadline = time.monotonic() + wait
        while True:
            left = max(0.0, deadline - time.monotonic())
            call = calls.result(self.service, request_id, left, not delete)
            found = calls.result_of(await self.send(call), request_id)
            if found is not None or time.monotonic() >= deadline:
                return found

    async def status(self, request_id: str) -> Status:
        return calls.status_of(await self.send(calls.status(self.service, request_id)))

    async def cancel(self, request_id: str) -> bool:
        found = await self.status(request_id)
        if found.state not in ("queued", "running") or found.index is None:
            return False
        await self.send(calls.delete(self.service, found.index))
        return True

    async def stream(self, request_id: str, *, read_timeout: float | None = None) -> AsyncIterator[StreamEvent]:
        """As `Client.stream`."""
        call = calls.stream(self.service, request_id)
        last_id = ""
        async for attempt in self.retry.asynchronous():
            with attempt:
                headers = {"Last-Event-ID": last_id} if last_id else {}
                try:
                    async with aconnect_sse(
                        self.http,
                        "GET",
                        call.path,
                        params=call.params,
                        headers=headers,
                        timeout=httpx.Timeout(self.timeout, read=read_timeout),
                    ) as source:
                        if source.response.status_code >= 400:
                            await source.response.aread()
                            raise_for(source.response)
                        async for sse in source.aiter_sse():
                            last_id = sse.id or last_id
                            event = calls.stream_event(sse)
                            if event is not None:
                                yield event
                            if isinstance(event, Done):
                                return
                except httpx.TransportError as exc:
                    raise Unreachable(f"stream of {request_id} broke: {exc}") from exc
                raise Unreachable(f"stream of {request_id} ended before its done event")

    async def watch(
        self,
        *,
        group: str = DEFAULT_GROUP,
        window: int = 10,
        start_index: int = 0,
        tags: Mapping[str, str] | None = None,
        sink: bool = True,
        commit: bool = True,
    ) -> AsyncIterator[Result]:
        """As `Client.watch`."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

        from queue_service.wire import decode_frame

        url = websocket_url(self.url, self.service, sink, watch_params(window, start_index, tags))
        headers = {GID_HEADER: group, UID_HEADER: f"py-{uuid.uuid4().hex[:12]}"}
        if self.token:
            headers["Authorization"] = self.token
        try:
            async with connect(url, additional_headers=headers, max_size=None) as socket:
                while True:
                    message = await socket.recv()
                    frame = decode_frame(message if isinstance(message, bytes) else message.encode())
                    yield frame_result(frame)
                    if commit:
                        await self.send(calls.commit(self.service, frame.index, sink))
        except InvalidStatus as exc:
            body = exc.response.body.decode(errors="replace") if exc.response.body else ""
            raise RequestFailed(exc.response.status_code, body) from None
        except (OSError, InvalidHandshake) as exc:
            raise Unreachable(f"cannot connect to {self.url}: {exc}") from exc
        except ConnectionClosed as exc:
            raise Unreachable(f"the API closed the watch: {exc}") from exc

    async def attributes(self, *, sink: bool = False) -> dict[str, str]:
        found: dict[str, str] = (await self.send(calls.attributes(self.service, sink))).json()
        return found

    async def commit(self, index: int, *, sink: bool = True) -> None:
        await self.send(calls.commit(self.service, index, sink))
