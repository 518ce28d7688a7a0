"""What one watch (WebSocket) does within a few seconds: refused, closed, delivering, or quietly open."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from queue_service.wire import decode_frame

UID_HEADER = "X-EAS-QueueService-Redis-Uid"
GID_HEADER = "X-EAS-QueueService-Redis-Gid"
POLICY_VIOLATION = 1008


def ws_url(base_url: str, path: str, **query: str) -> str:
    return base_url.replace("http://", "ws://", 1) + path + ("?" + urlencode(query) if query else "")


@dataclass(frozen=True)
class WatchOutcome:
    denied_status: int | None = None  # the handshake was refused with this HTTP status
    close_code: int | None = None  # accepted, then closed by the server with this code
    close_reason: str = ""
    frame_index: int | None = None  # accepted, and this item was delivered

    def closed_for_policy(self, naming: str) -> bool:
        """Accepted, then closed with 1008 and a reason that names `naming`."""
        return self.close_code == POLICY_VIOLATION and naming.lower() in self.close_reason.lower()

    def __str__(self) -> str:
        if self.denied_status is not None:
            return f"handshake refused with HTTP {self.denied_status}: {self.close_reason!r}"
        if self.close_code is not None:
            return f"accepted, then closed with code {self.close_code} reason {self.close_reason!r}"
        if self.frame_index is not None:
            return f"accepted, and delivered item {self.frame_index}"
        return "accepted, and still open"


def observe_watch(url: str, headers: Mapping[str, str] | None = None, seconds: float = 5) -> WatchOutcome:
    """Open a watch and report the first thing it does within `seconds`; it is closed on return."""
    try:
        with connect(url, additional_headers=dict(headers or {}), open_timeout=20) as ws:
            try:
                message = ws.recv(timeout=seconds)
            except TimeoutError:
                return WatchOutcome()
            except ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
                return WatchOutcome(close_code=code, close_reason=reason)
            assert isinstance(message, bytes), message
            return WatchOutcome(frame_index=decode_frame(message).index)
    except InvalidStatus as exc:
        return WatchOutcome(
            denied_status=exc.response.status_code, close_reason=exc.response.body.decode(errors="replace")
        )
