"""One attempt of a delivery: POST the body to the URL, over an address that was checked, within a deadline.

The URL's host is resolved and every address checked (`addresses.py`) unless the service allows private ones;
the connection then goes to a checked address (Host and TLS SNI stay the name's), so a second lookup cannot
answer differently (DNS rebinding). Redirects 307 and 308 (which keep the POST) are followed, each hop checked
the same way, up to MAX_REDIRECTS; other 3xx answers are failed attempts. The whole attempt, connecting and
the answer's first bytes included, is cut off at `timeout`: a receiver that hangs or trickles cannot hold a
dispatcher. At most ANSWER_BYTES of the answer are read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx

from queue_service.webhooks.addresses import RefusedAddress, resolve

MAX_REDIRECTS = 3
ANSWER_BYTES = 4096
USER_AGENT = "queue-service-webhooks/1"


@dataclass(frozen=True, slots=True)
class Answer:
    """How an attempt went: the receiver's status (0: none), its Retry-After in seconds, or what failed."""

    status: int = 0
    retry_after: float | None = None
    error: str = ""

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        return self.status == 410


async def post(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout: float,
    allow_private: bool,
) -> Answer:
    try:
        async with asyncio.timeout(timeout):
            return await _post(client, url, body, headers, allow_private)
    except TimeoutError:
        return Answer(error=f"no answer within {timeout:g} s (webhook.timeout_seconds)")
    except RefusedAddress as exc:
        return Answer(error=f"refused: {exc}")
    except httpx.HTTPError as exc:
        return Answer(error=f"{type(exc).__name__}: {exc}"[:300])


async def _post(
    client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str], allow_private: bool
) -> Answer:
    for _ in range(MAX_REDIRECTS + 1):
        target = httpx.URL(url)
        port = target.port or (443 if target.scheme == "https" else 80)
        resolved = await resolve(target.host, port, allow_private=allow_private)
        request_headers = {**headers, "user-agent": USER_AGENT, "host": target.netloc.decode("ascii")}
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        # Connect to the address just checked: the name is not looked up again by the HTTP client.
        pinned = target.copy_with(host=str(resolved.addresses[0]))
        request = client.build_request("POST", pinned, content=body, headers=request_headers, extensions=extensions)
        response = await client.send(request, stream=True)
        try:
            await _read_some(response)
        finally:
            await response.aclose()
        if response.status_code in (307, 308) and "location" in response.headers:
            url = urljoin(url, response.headers["location"])
            continue
        if 300 <= response.status_code < 400:
            return Answer(response.status_code, error=f"redirect {response.status_code} not followed (only 307/308)")
        return Answer(response.status_code, _retry_after(response))
    return Answer(error=f"more than {MAX_REDIRECTS} redirects")


async def _read_some(response: httpx.Response) -> None:
    read = 0
    async for chunk in response.aiter_raw():
        read += len(chunk)
        if read >= ANSWER_BYTES:
            break


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after", "")
    return float(raw) if raw.isdigit() else None
