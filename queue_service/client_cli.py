"""`queue-service` commands for people and scripts: put, get, watch, attrs, health — HTTP clients of the API.

They speak only the public queue protocol (the same calls as curl or the official clients), so they
work against any deployment: `queue-service up`, docker compose, or a remote host.
"""

from __future__ import annotations

import base64
import json
import shlex
import sys
import time
from collections.abc import Callable
from typing import IO, Any, NoReturn, TypeVar

import click
import httpx

from queue_service.client import (
    Chunk,
    Client,
    Done,
    NotFound,
    RequestFailed,
    Restart,
    Result,
    RetryPolicy,
    Unreachable,
    calls,
)
from queue_service.client import Progress as Reported

T = TypeVar("T")

EXIT_OK = 0
EXIT_REFUSED = 1  # the server said no: an error status, a processor's error result, not ready
EXIT_USAGE = 2  # click's own code for a bad command line
EXIT_TIMEOUT = 3  # no result within --timeout
EXIT_NO_CONNECTION = 4  # the API cannot be reached
EXIT_INTERRUPTED = 130  # Ctrl-C while waiting (128 + SIGINT, as shells report it)

EXIT_CODES_HELP = """\b
Exit codes:
  0  ok
  1  the server said no (an error status, a processor's error result) or is not ready
  2  usage error (bad options or arguments)
  3  timed out waiting for a result
  4  cannot connect to the API
  130  interrupted (Ctrl-C) while waiting; the request stays queued
"""

DEFAULT_URL = "http://127.0.0.1:8000"
# Longest single long poll: a terminal's progress line is refreshed this often.
PROGRESS_POLL_SECONDS = 0.5
# Without a terminal nobody watches progress: fewer, longer polls.
QUIET_POLL_SECONDS = 5.0


class CliError(click.ClickException):
    """A failure reported as `Error: ...` on stderr with one of the documented exit codes."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per exception; its ClassVar is a default


# --- the API over HTTP: the Python client, its failures as CLI errors ------------------------


class Api:
    """The queue API of one deployment (`queue_service.client`); every failure becomes a CliError with its
    exit code. No retries: a script sees a full queue (450) at once and decides itself."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._clients: dict[str, Client] = {}

    def client(self, service: str) -> Client:
        if service not in self._clients:
            self._clients[service] = Client(self.url, service, token=self.token, retry=RetryPolicy.never())
        return self._clients[service]

    def call(self, work: Callable[[], T]) -> T:
        try:
            return work()
        except Unreachable as exc:
            raise CliError(str(exc), EXIT_NO_CONNECTION) from None
        except RequestFailed as exc:
            raise CliError(f"{exc.status} {exc.detail}", EXIT_REFUSED) from None

    def put(self, service: str, body: bytes, tags: dict[str, str], priority: bool) -> tuple[int, str]:
        submitted = self.call(lambda: self.client(service).put(body, tags=tags, priority=priority))
        return submitted.index, submitted.request_id

    def result(self, service: str, request_id: str, wait: float, keep: bool) -> Result | None:
        """The result of `request_id`, waiting up to `wait` seconds for it; None when not there yet."""
        return self.call(lambda: self.client(service).result(request_id, wait=wait, delete=not keep))

    def status(self, service: str, request_id: str) -> dict[str, Any] | None:
        """What a request is doing (`_status_`): queued, running, or how it ended; None for an unknown id."""

        def known() -> dict[str, Any] | None:
            try:
                return self.client(service).status(request_id).raw
            except NotFound:
                return None

        return self.call(known)

    def commit(self, service: str, index: int, sink: bool) -> None:
        self.call(lambda: self.client(service).commit(index, sink=sink))

    def attributes(self, service: str, sink: bool) -> dict[str, str]:
        return self.call(lambda: self.client(service).attributes(sink=sink))

    def readiness(self, api_only: bool = False) -> httpx.Response:
        return self.call(lambda: self.client("").send(calls.readiness(api_only), accept=(503,)))


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else response.text.strip()[:500]


# --- waiting for a result ----------------------------------------------------------------


class Progress:
    """One status line on stderr, rewritten in place; used only when stderr is a terminal."""

    def __init__(self, stream: IO[str], label: str, started: float) -> None:
        self.stream = stream
        self.label = label
        self.started = started

    def show(self, state: str) -> None:
        self.stream.write(f"\r\x1b[K{self.label}: {state} ({time.monotonic() - self.started:.1f}s)")
        self.stream.flush()

    def finish(self, state: str) -> None:
        self.stream.write(f"\r\x1b[K{self.label}: {state} in {time.monotonic() - self.started:.1f}s\n")
        self.stream.flush()


def describe(status: dict[str, Any] | None) -> str:
    """One phrase for the progress line, from a `_status_` answer."""
    state = status.get("state") if status else None
    if state == "queued":
        ahead = int(status.get("position", 0)) if status else 0
        return "waiting, next in queue" if ahead == 0 else f"waiting, {ahead} ahead in queue"
    if state == "running":
        deliveries = int(status.get("deliveries", 1)) if status else 1
        running = "running" if deliveries <= 1 else f"running (delivery {deliveries})"
        progress = status.get("progress") if status else None
        return running + (f", {describe_progress(progress)}" if progress else "")
    return "processed, reading the result"


def describe_progress(progress: dict[str, Any]) -> str:
    """`40% (step 4 of 10)` from what a processor reported (`_status_`'s `progress`, a stream's progress event)."""
    percent = f"{float(progress.get('fraction', 0)) * 100:.0f}%"
    message = str(progress.get("message") or "")
    return f"{percent} ({message})" if message else percent


def explain_missing(api: Api, service: str, request_id: str, timeout: float | None) -> CliError:
    """Why there is no result to print, as far as the service knows (`_status_`), with the matching exit code."""
    status = api.status(service, request_id)
    if status is None:
        return CliError(
            f"request id {request_id} is unknown to service {service} (never accepted there, or it finished "
            "more than a day ago)",
            EXIT_REFUSED,
        )
    state = status.get("state")
    if status.get("result") == "removed":
        return CliError(
            f"request {request_id} finished ({state}, status {status.get('statusCode')}), and its result was "
            "already read with auto-delete (or deleted): nothing is left to get",
            EXIT_REFUSED,
        )
    waited = f" after {timeout:g}s" if timeout else ""
    return CliError(
        f"no result for request id {request_id}{waited}: it is {describe(status)}; it will come: "
        f"{get_command(api, service, request_id, timeout=60)}",
        EXIT_TIMEOUT,
    )


def wait_for_result(
    api: Api,
    service: str,
    request_id: str,
    *,
    timeout: float | None,
    keep: bool,
    progress: Progress | None = None,
) -> Result:
    """Long-poll the sink until the result of `request_id` is there; CliError(EXIT_TIMEOUT) after `timeout`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    poll = PROGRESS_POLL_SECONDS if progress else QUIET_POLL_SECONDS
    while True:
        if progress is not None:
            progress.show(describe(api.status(service, request_id)))
        left = poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic()))
        result = api.result(service, request_id, left, keep)
        if result is not None:
            if progress is not None:
                progress.finish("done" if result.status == 200 else f"failed with status {result.status}")
            return result
        if deadline is not None and time.monotonic() >= deadline:
            if progress is not None:
                progress.finish("still no result")
            raise explain_missing(api, service, request_id, timeout)


def stream_output(
    api: Api,
    service: str,
    request_id: str,
    *,
    timeout: float | None,
    keep: bool,
    progress: Progress | None,
    raw: bool,
) -> bool:
    """Print a request's output as it streams (chunks on stdout as they come, progress on the progress line);
    False when it has no stream to read (then its result is read from the sink as without --stream)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    # A broken connection is resumed after the last event seen (Last-Event-ID): a few times, then it is an error.
    client = Client(api.url, service, token=api.token, retry=RetryPolicy(max_attempts=6, max_wait_seconds=2.0))
    out = sys.stdout.buffer
    wrote_newline = True
    # Keep-alive comments come every few seconds: a read waiting longer than this is a dead connection.
    read_timeout = 60.0 if timeout is None else max(1.0, min(60.0, timeout))

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() >= deadline - 0.1

    try:
        for event in client.stream(request_id, read_timeout=read_timeout):
            if out_of_time():
                break
            if isinstance(event, Chunk):
                out.write(event.data)
                out.flush()
                wrote_newline = event.data.endswith(b"\n") if event.data else wrote_newline
            elif isinstance(event, Reported) and progress is not None:
                progress.show(f"running, {describe_progress(event.raw if isinstance(event.raw, dict) else {})}")
            elif isinstance(event, Restart) and progress is not None:
                progress.show("restarted on another worker (its output starts again)")
            elif isinstance(event, Done):
                if not raw and not wrote_newline:
                    out.write(b"\n")
                    out.flush()
                if progress is not None:
                    progress.finish("done" if event.ok else f"failed with status {event.status}")
                if not keep:  # the result is in the sink too: read with --wait, it is removed as usual
                    api.result(service, request_id, 0, keep=False)
                if not event.ok:
                    raise CliError(
                        f"the processor answered status {event.status} (request id {request_id})"
                        + (f": {event.message}" if event.message else ""),
                        EXIT_REFUSED,
                    )
                return True
    except Unreachable as exc:
        if not out_of_time():
            raise CliError(f"stream of {request_id} from {api.url}: {exc}", EXIT_NO_CONNECTION) from None
    except NotFound:
        return False  # no stream to read: unknown, or finished with nothing to replay
    except RequestFailed as exc:
        raise CliError(f"stream of {request_id}: {exc.status} {exc.detail}", EXIT_REFUSED) from None
    finally:
        client.close()
    if progress is not None:
        progress.finish("still running")
    raise explain_missing(api, service, request_id, timeout)


def get_command(api: Api, service: str, request_id: str, timeout: float | None = None) -> str:
    """The `queue-service get` command line that fetches this result later (the token is not shown)."""
    words = ["queue-service", "get", "-s", service]
    if api.url != DEFAULT_URL:
        words += ["--url", api.url]
    if timeout is not None:
        words += ["--timeout", f"{timeout:g}"]
    return shlex.join([*words, request_id])


def warn_if_no_live_worker(api: Api, service: str) -> None:
    """Say once that nobody serves the service yet: a put waits for a worker, it is not refused."""
    try:
        live = int(api.attributes(service, sink=False).get("workers.live", "1"))
    except (CliError, ValueError):
        return  # only a hint: the wait that follows reports real failures itself
    if live == 0:
        click.echo(f"no live worker for {service}: the request waits in the queue until a worker starts", err=True)


def emit_result(result: Result, raw: bool) -> None:
    """The body on stdout (exact bytes with --raw, else text); a processor's error status exits 1."""
    if raw:
        click.echo(result.data, nl=False)
    else:
        text = result.text
        click.echo(text, nl=not text.endswith("\n"))
    if result.status != 200:
        raise CliError(f"the processor answered status {result.status} (request id {result.request_id})", EXIT_REFUSED)


# --- options shared by the commands --------------------------------------------------------


def _check_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise click.BadParameter(f"must start with http:// or https://, got {value!r}")
    return value


def _parse_tags(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for value in values:
        key, sep, tag = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}")
        if key.startswith("_") or key == "requestId":
            raise click.BadParameter(f"{key!r} is reserved by the queue protocol; tag names may not start with '_'")
        tags[key] = tag
    return tags


url_option = click.option(
    "--url",
    default=DEFAULT_URL,
    envvar="QS_URL",
    show_default=True,
    show_envvar=True,
    callback=_check_url,
    help="Base URL of the queue-service API.",
)
token_option = click.option(
    "--token", envvar="QS_TOKEN", show_envvar=True, help="The service's token, sent as the Authorization header."
)
service_option = click.option(
    "--service", "-s", required=True, envvar="QS_SERVICE", show_envvar=True, help="Service name."
)
keep_option = click.option(
    "--keep",
    is_flag=True,
    help="Leave the result in the sink. By default reading it removes it, so the sink does not fill up.",
)
raw_option = click.option("--raw", is_flag=True, help="Write the result's exact bytes, with no newline added.")
tag_option = click.option(
    "--tag", "tags", multiple=True, metavar="KEY=VALUE", callback=_parse_tags, help="A tag; repeatable."
)


def client_command(function: Callable[..., None]) -> click.Command:
    """A click command whose --help ends with the exit codes."""
    return click.command(epilog=EXIT_CODES_HELP)(function)


def _fail(message: str, exit_code: int) -> NoReturn:
    raise CliError(message, exit_code)


# --- commands ------------------------------------------------------------------------------


@client_command
@click.argument("body_file", metavar="[FILE]", type=click.File("rb"), default="-")
@service_option
@url_option
@token_option
@tag_option
@click.option("--priority", is_flag=True, help="Put the request ahead of normal ones (_priority_=1).")
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option("--timeout", type=click.FloatRange(min=0), help="With --wait: seconds to wait before exiting with 3.")
@click.option("--stream", is_flag=True, help="With --wait: print the output as the processor streams it.")
@keep_option
@raw_option
def put(
    body_file: IO[bytes],
    service: str,
    url: str,
    token: str | None,
    tags: dict[str, str],
    priority: bool,
    wait: bool,
    timeout: float | None,
    stream: bool,
    keep: bool,
    raw: bool,
) -> None:
    """Put a body (FILE, or stdin) on a service's input queue.

    Without --wait, prints the index and the request id, tab-separated. With --wait, prints the
    result body; on a terminal, the request id is shown as soon as the put is accepted, then the
    position in the queue, running, and done, with the elapsed time (nothing is shown when stderr
    is not a terminal). Ctrl-C while waiting prints the `get` command that fetches the result
    later, and exits 130. A service with no live worker is named once; the wait goes on. With
    --stream, the output is printed as the processor streams it (a processor that streams nothing:
    its result when it ends), and its progress reports drive the progress line.

    \b
    Examples:
      echo hello | queue-service put -s echo --wait
      echo "20 50" | queue-service put -s llm --wait --stream
      queue-service put -s sleep --wait --timeout 60 seconds.txt
      rid=$(echo 2 | queue-service put -s sleep | cut -f2)
    """
    if body_file.isatty():
        raise click.UsageError("no body: give a FILE, or pipe the body in (echo hello | queue-service put -s echo)")
    if not wait and (timeout is not None or keep or raw or stream):
        raise click.UsageError("--timeout, --stream, --keep and --raw need --wait")
    body = body_file.read()
    api = Api(url, token)
    started = time.monotonic()
    index, request_id = api.put(service, body, tags, priority)
    if not wait:
        click.echo(f"{index}\t{request_id}")
        return
    stderr = sys.stderr
    progress = Progress(stderr, f"{service} #{index}", started) if stderr.isatty() else None
    try:
        if progress is not None:
            # Before anything else can go wrong: the id is what fetches the result later.
            click.echo(f"accepted: index {index}, request id {request_id}", err=True)
        warn_if_no_live_worker(api, service)
        if stream:
            streamed = stream_output(api, service, request_id, timeout=timeout, keep=keep, progress=progress, raw=raw)
            if streamed:
                return
        result = wait_for_result(api, service, request_id, timeout=timeout, keep=keep, progress=progress)
    except KeyboardInterrupt:
        if progress is not None:
            stderr.write("\n")  # end the progress line
        click.echo(
            f"interrupted; the request goes on (request id {request_id}). Get its result later with: "
            f"{get_command(api, service, request_id, timeout=60)}",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    emit_result(result, raw)


@client_command
@click.argument("request_id")
@service_option
@url_option
@token_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds to wait for the result to appear (0: look once) before exiting with 3.",
)
@keep_option
@raw_option
def get(request_id: str, service: str, url: str, token: str | None, timeout: float, keep: bool, raw: bool) -> None:
    """Print a request's result, by the request id that `put` printed.

    \b
    Examples:
      queue-service get -s echo 0b7e5c4e-...
      queue-service get -s sleep --timeout 120 --raw "$rid" > result.json
    """
    result = wait_for_result(Api(url, token), service, request_id, timeout=timeout, keep=keep)
    emit_result(result, raw)


@client_command
@service_option
@url_option
@token_option
@click.option("--window", type=click.IntRange(min=1), default=10, show_default=True, help="Items held uncommitted.")
@click.option(
    "--group",
    default="eas",
    show_default=True,
    help="Consumer group: watchers of one group share the items; each group gets every item.",
)
@click.option("--index", "start_index", type=click.IntRange(min=0), default=0, help="Start at this index (0: head).")
@click.option("--count", type=click.IntRange(min=1), help="Exit after this many items.")
@click.option("--input", "input_queue", is_flag=True, help="Watch the input queue instead of the sink.")
@tag_option
def watch(
    service: str,
    url: str,
    token: str | None,
    window: int,
    group: str,
    start_index: int,
    count: int | None,
    input_queue: bool,
    tags: dict[str, str],
) -> None:
    """Print a sink's results as they come, committing each.

    One JSON line per item: {"index", "tags", "data"} (data as text, or "data_base64" when it is
    not UTF-8). A printed item is committed, so it is gone from the sink. Ctrl-C stops (exit 0).

    \b
    Examples:
      queue-service watch -s echo
      queue-service watch -s sleep --count 1 | jq .data
    """
    api = Api(url, token)
    results = api.client(service).watch(
        group=group, window=window, start_index=start_index, tags=tags, sink=not input_queue, commit=False
    )
    seen = 0
    try:
        for result in results:
            click.echo(json.dumps(_item_json(result.index, result.tags, result.data), ensure_ascii=False))
            api.commit(service, result.index, sink=not input_queue)  # printed, then committed
            seen += 1
            if count is not None and seen >= count:
                break
    except KeyboardInterrupt:
        return
    except RequestFailed as exc:
        _fail(f"watch refused: {exc.status} {exc.detail}".strip(), EXIT_REFUSED)
    except Unreachable as exc:
        _fail(str(exc), EXIT_NO_CONNECTION)
    finally:
        results.close()


def _item_json(index: int, tags: dict[str, str], data: bytes) -> dict[str, Any]:
    item: dict[str, Any] = {"index": index, "tags": tags}
    try:
        item["data"] = data.decode("utf-8")
    except UnicodeDecodeError:
        item["data_base64"] = base64.b64encode(data).decode("ascii")
    return item


@client_command
@service_option
@url_option
@token_option
@click.option("--sink", is_flag=True, help="The sink's attributes instead of the input queue's.")
def attrs(service: str, url: str, token: str | None, sink: bool) -> None:
    """Print a queue's attributes as JSON.

    They include the length, items waiting and in flight, live workers, and the backlog per worker
    (the signal to scale workers on).

    \b
    Examples:
      queue-service attrs -s echo
      queue-service attrs -s echo | jq -r '."workers.backlogPerWorker"'
    """
    click.echo(json.dumps(Api(url, token).attributes(service, sink), indent=2, sort_keys=True))


@client_command
@url_option
@click.option("--api-only", is_flag=True, help="Only check that the API answers and reaches Redis.")
def health(url: str, api_only: bool) -> None:
    """Check that every service can serve now (GET /readyz): Redis reachable, a live worker, room in its sink.

    Exits 0 when all can, and prints each service that cannot with why (exit 1); exits 1 when the API
    cannot reach Redis. With --api-only, only the API and its Redis are checked (async puts are accepted
    with no worker: that is what a load balancer wants to know).

    \b
    Examples:
      queue-service health && echo ready
      queue-service health --url http://gpu-box:8000 --api-only
    """
    response = Api(url, None).readiness(api_only)
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if body.get("redis", "ok") != "ok":
        _fail(f"not ready: Redis {body.get('redis')}", EXIT_REFUSED)
    if response.status_code == 200:
        click.echo("ready: Redis ok" + ("" if api_only else ", every service can serve"))
        return
    if response.status_code != 503 or "services" not in body:
        _fail(f"not ready: {_detail(response)}", EXIT_REFUSED)
    for name, verdict in body["services"].items():
        if not verdict.get("ready"):
            click.echo(f"{name}: cannot serve: {'; '.join(verdict.get('reasons', []))}")
    sys.exit(EXIT_REFUSED)
