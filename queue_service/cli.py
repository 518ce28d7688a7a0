"""`queue-service` commands. `up` runs everything on one machine: redis-server, the API, rq workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import click
from pydantic import ValidationError

from queue_service.client_cli import attrs, get, health, put, watch
from queue_service.config import ConfigError, ServiceConfig, ServicesFile, load_services
from queue_service.embedded_redis import RedisServer, RedisServerError, RedisServerNotFound
from queue_service.preflight import PreflightError, bind_listener, check_processors, check_redis
from queue_service.serve import api
from queue_service.store.connection import rq_cli_options
from queue_service.supervisor import SupervisionFailed, Supervisor, UpSettings
from queue_service.webhooks.commands import webhooks

WORKER_CLASS = "workers.worker.QueueWorker"
# prometheus_client's multiprocess mode (api/metrics.py reads it; not imported here: the CLI starts light).
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_command(service: str, redis_url: str) -> list[str]:
    """One worker of one service: it loads only that service's processor.

    Redis comes from QS_REDIS_URL (in the workers' environment) for rq's CLI too (`-c workers.rq_settings`, and
    on a cluster our cluster client as rq's connection class): every URL kind works, and its password is on no
    command line."""
    return [sys.executable, "-m", "rq.cli", "worker", "-w", WORKER_CLASS, *rq_cli_options(redis_url), service]


def api_command(fd: int) -> list[str]:
    """The API (`queue-service api`, queue_service/serve.py) on a socket `up` has bound already."""
    return [sys.executable, "-m", "queue_service.serve", "--fd", str(fd)]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """queue-service: asynchronous inference queues on Redis streams, served by rq workers."""


# The commands for people and scripts (HTTP clients of the API) live in their own module.
for command in (put, get, watch, attrs, health):
    main.add_command(command)
main.add_command(webhooks)


def dispatcher_command() -> list[str]:
    """The webhook dispatcher (`queue-service webhooks`); its settings come from the environment `up` sets."""
    return [sys.executable, "-m", "queue_service.cli", "webhooks"]


# The API alone: what a container of the API runs (`up` runs it too, on the socket it bound).
main.add_command(api)


@main.command()
@click.option(
    "--services",
    "services_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="QS_SERVICES",
    help="Services file (YAML). Default: a built-in open `echo` service.",
)
@click.option("--redis-url", envvar="QS_REDIS_URL", help="Use this Redis instead of starting an embedded redis-server.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the embedded Redis's data here, with AOF persistence (default: a temp dir, not kept).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API listens on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port the API listens on.")
@click.option(
    "--workers",
    "worker_count",
    type=click.IntRange(min=0),
    help="rq worker processes per service. Default: metadata.rpc.worker_threads of them, or one holding that "
    "many requests for an async processor, an upstream or a thread-safe one.",
)
@click.option(
    "--api-workers",
    "api_processes",
    default=1,
    show_default=True,
    type=click.IntRange(min=1, max=64),
    help="API processes (uvicorn workers) sharing the port; /metrics sums their counters.",
)
def up(
    services_file: Path | None,
    redis_url: str | None,
    data_dir: Path | None,
    host: str,
    port: int,
    worker_count: int | None,
    api_processes: int,
) -> None:
    """Run the service on this machine: Redis (embedded unless --redis-url), the API and workers.

    Each service gets workers of its own, which load only its processor. Before starting anything,
    `up` checks that the port is free, that Redis answers and that every processor can be loaded;
    a worker that keeps failing at start is retried with backoff, then `up` gives up (exit 1).

    \b
    Example:
      queue-service up
      curl -X POST --data hello http://127.0.0.1:8000/api/predict/echo
    Ctrl-C stops every process it started.
    """
    try:
        settings = UpSettings()
        services = load_services(services_file)
    except ValidationError as exc:
        problems = "; ".join(f"QS_UP_{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors())
        raise click.ClickException(problems) from None
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None

    env = dict(os.environ)
    if services_file:
        env["QS_SERVICES"] = str(services_file.resolve())
    else:
        env.pop("QS_SERVICES", None)

    listener, counts = _check_before_start(services, worker_count, host, port, redis_url, settings, env)
    _warn_open_services(services, host, port)

    redis_server: RedisServer | None = None
    if not redis_url:
        try:
            redis_server = RedisServer(data_dir=data_dir, appendonly=data_dir is not None).start()
        except (RedisServerNotFound, RedisServerError) as exc:
            listener.close()
            raise click.ClickException(str(exc)) from None
        redis_url = redis_server.url
        click.echo(f"redis-server (embedded) on {redis_url}", err=True)
    env["QS_REDIS_URL"] = redis_url
    metrics_dir: Path | None = None
    if api_processes > 1 and not env.get(MULTIPROC_DIR_ENV):
        # Each API process writes its counters here; a scrape of any one sums them all (api/metrics.py).
        # A new, empty one per run: counters left by an earlier run would be counted again.
        metrics_dir = Path(tempfile.mkdtemp(prefix="qs-metrics-"))
        env[MULTIPROC_DIR_ENV] = str(metrics_dir)

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    supervisor = Supervisor(env, settings, say=lambda line: click.echo(line, err=True))
    failure: SupervisionFailed | None = None
    try:
        supervisor.start_api(api_command(listener.fileno()), pass_fds=[listener.fileno()], count=api_processes)
        # The API holds the socket now; this process must not keep the port once the API is gone.
        listener.close()
        for service in services.services:
            supervisor.add_workers(service.name, worker_command(service.name, redis_url), counts[service.name])
            count = counts[service.name]
            click.echo(f"{service.name}: {count} worker{'' if count == 1 else 's'}", err=True)
        if any(service.webhook is not None for service in services.services):
            # Supervised like a worker: restarted when it exits, given up on when it cannot start.
            supervisor.add_workers("webhooks", dispatcher_command(), 1)
            click.echo("webhooks: 1 dispatcher", err=True)
        shown_host = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL writes it
        processes = f" ({api_processes} processes)" if api_processes > 1 else ""
        click.echo(f"API on http://{shown_host}:{port}{processes}; Ctrl-C stops everything", err=True)
        supervisor.run(lambda: stopping)
    except SupervisionFailed as exc:
        failure = exc
    finally:
        supervisor.stop_all(redis_server=redis_server)
        if redis_server is not None:
            redis_server.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if failure is not None:
        raise click.ClickException(str(failure))


def _check_before_start(
    services: ServicesFile,
    worker_count: int | None,
    host: str,
    port: int,
    redis_url: str | None,
    settings: UpSettings,
    env: dict[str, str],
) -> tuple[socket.socket, dict[str, int]]:
    """Every check before anything starts: the API's bound socket and the worker processes per service, or
    one line and exit 1, nothing left."""
    try:
        listener = bind_listener(host, port)
    except PreflightError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        if redis_url:
            check_redis(redis_url)
        # Services without workers here are served elsewhere: their processors need not load on this machine.
        served_here = services.services if worker_count != 0 else []
        concurrent = check_processors(served_here, settings.preflight_timeout_seconds, env=env)
    except PreflightError as exc:
        listener.close()
        raise click.ClickException(str(exc)) from None
    return listener, {service.name: processes(service, worker_count, concurrent) for service in services.services}


def processes(service: ServiceConfig, worker_count: int | None, concurrent: set[str]) -> int:
    """Worker processes of a service: --workers, else `worker_threads` requests at once: one process holds
    them all for a processor that can (async, an upstream, thread-safe), else one process per request."""
    if worker_count is not None:
        return worker_count
    return 1 if service.name in concurrent else service.rpc.worker_threads


def _warn_open_services(services: ServicesFile, host: str, port: int) -> None:
    for service in services.services:
        if not service.token:
            click.secho(
                f"warning: service {service.name!r} has no token: anyone who can reach {host}:{port} can use it",
                fg="yellow",
                err=True,
            )


if __name__ == "__main__":
    main()
