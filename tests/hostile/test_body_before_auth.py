"""Issue 9, item 5: a token-protected service refuses a missing or wrong token before it reads the body.

Raw sockets: the attack is a client that declares a big body and then sends little or nothing,
which an HTTP library would not do.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest

from tests.conftest import ServicesFileFactory
from tests.hostile.conftest import ApiWithEnv
from tests.hostile.probes import MIB, memory_mib
from tests.hostile.raw_http import RawAnswer, close, host_port, read_answer, request_head
from tests.integration.conftest import ECHO

pytestmark = pytest.mark.integration

TOKEN = "secret"
PATH = "/api/predict/tok"
DECLARED = 8 * MIB  # the service's default max_payload_size_kb: not a 413
ANSWER_WITHIN_SECONDS = 5.0
BODY_TIMEOUT_SECONDS = 2
TRICKLE_DECLARED = MIB
TRICKLE_ANSWER_WITHIN_SECONDS = 12.0
UPLOADS = 40
RSS_GROWTH_BOUND_MIB = 100


@pytest.fixture
def token_service(services_file: ServicesFileFactory) -> Path:
    """A services file whose one service, `tok`, needs the token."""
    return services_file([{"name": "tok", "processor": ECHO, "token": TOKEN}])


async def declare_big_send_little(base_url: str, auth: dict[str, str]) -> RawAnswer | None:
    host, port = host_port(base_url)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        headers = {"Content-Length": str(DECLARED), **auth}
        writer.write(request_head("POST", PATH, f"{host}:{port}", headers) + b"x" * 1024)
        await writer.drain()
        return await read_answer(reader, ANSWER_WITHIN_SECONDS)
    finally:
        await close(writer)


@pytest.mark.parametrize("auth", [{}, {"Authorization": "Bearer nope"}], ids=["no-token", "wrong-bearer"])
def test_a_request_without_the_token_gets_401_before_its_body_is_sent(
    api_with_env: ApiWithEnv, token_service: Path, auth: dict[str, str]
) -> None:
    service = api_with_env(token_service)
    answer = asyncio.run(declare_big_send_little(service.url, auth))
    assert answer is not None, (
        f"no answer within {ANSWER_WITHIN_SECONDS:g} s to a POST declaring {DECLARED} bytes with {auth or 'no token'} "
        "and sending 1 KiB: the API waits for the body before it checks the token"
    )
    assert answer.status == 401, str(answer)
    assert answer.detail(), f"401 without a JSON detail: {answer}"


async def trickle(base_url: str) -> RawAnswer | None:
    """An authorized upload declaring 1 MiB that sends 10 bytes a second."""
    host, port = host_port(base_url)
    reader, writer = await asyncio.open_connection(host, port)
    headers = {"Content-Length": str(TRICKLE_DECLARED), "Authorization": TOKEN}
    writer.write(request_head("POST", PATH, f"{host}:{port}", headers))

    async def drip() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                writer.write(b"0123456789")
                await writer.drain()
                await asyncio.sleep(1)

    dripping = asyncio.create_task(drip())
    try:
        return await read_answer(reader, TRICKLE_ANSWER_WITHIN_SECONDS)
    finally:
        dripping.cancel()
        await close(writer)


def test_a_trickled_body_gets_408_once_the_body_deadline_passes(api_with_env: ApiWithEnv, token_service: Path) -> None:
    service = api_with_env(token_service, env={"QS_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT_SECONDS)})
    answer = asyncio.run(trickle(service.url))
    assert answer is not None, (
        f"no answer within {TRICKLE_ANSWER_WITHIN_SECONDS:g} s to a body trickled at 10 bytes/s "
        f"(QS_BODY_TIMEOUT_SECONDS={BODY_TIMEOUT_SECONDS})"
    )
    assert answer.status == 408, str(answer)
    assert "body" in answer.detail().lower(), f"the 408 does not say the body read timed out: {answer}"


async def unauthenticated_upload(base_url: str) -> None:
    """Declare 8 MiB and send all but the last byte, without a token; wait a moment for an answer, then leave."""
    host, port = host_port(base_url)
    reader, writer = await asyncio.open_connection(host, port)
    answer = asyncio.create_task(read_answer(reader, 30))
    chunk = bytes(64 * 1024)
    try:
        writer.write(request_head("POST", PATH, f"{host}:{port}", {"Content-Length": str(DECLARED)}))
        left = DECLARED - 1
        with contextlib.suppress(ConnectionError, OSError):
            while left > 0 and not answer.done():
                writer.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
                await writer.drain()
        # Held a little: what a server that buffers bodies keeps, it keeps while the client stays.
        await asyncio.wait({answer}, timeout=3)
    finally:
        answer.cancel()
        await close(writer)


def test_unauthenticated_uploads_do_not_grow_the_api_memory(api_with_env: ApiWithEnv, token_service: Path) -> None:
    service = api_with_env(token_service)
    pid = service.process.pid
    before = memory_mib(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                peak.append(memory_mib(pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def uploads() -> None:
        await asyncio.gather(*(unauthenticated_upload(service.url) for _ in range(UPLOADS)))

    try:
        asyncio.run(uploads())
    finally:
        done.set()
        sampler.join()
    growth = max(peak) - before
    print(f"\nRELIABILITY {UPLOADS} unauthenticated 8 MiB uploads: API RSS {before:.0f} -> peak {max(peak):.0f} MiB")
    assert growth <= RSS_GROWTH_BOUND_MIB, (
        f"{UPLOADS} unauthenticated 8 MiB uploads grew the API from {before:.0f} to {max(peak):.0f} MiB"
    )
