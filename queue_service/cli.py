"""`queue-service` commands. `up` runs everything on one machine: redis-server, the API, rq workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from queue_service.client_cli import attrs, get, health, put, watch
from queue_service.config import ConfigError, load_services
from queue_service.embedded_redis import RedisServer, RedisServerError, RedisServerNotFound

WORKER_CLASS = "workers.worker.QueueWorker"
# A worker that keeps dying is restarted at most this often, so a broken processor cannot spin.
RESTART_DELAY_SECONDS = 2.0
# How long workers may take to stop once the embedded Redis is gone: they can hand in nothing more.
LOST_REDIS_GRACE_SECONDS = 2.0


def worker_command(redis_url: str) -> list[str]:
    return [sys.executable, "-m", "rq.cli", "worker", "-w", WORKER_CLASS, "--url", redis_url]


def api_command(host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "queue_service.api:create_app",
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
    ]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """queue-service: asynchronous inference queues on Redis streams, served by rq workers."""


# The commands for people and scripts (HTTP clients of the API) live in their own module.
for command in (put, get, watch, attrs, health):
    main.add_command(command)


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
    help="rq worker processes to run. Default: the largest metadata.rpc.worker_threads.",
)
def up(
    services_file: Path | None,
    redis_url: str | None,
    data_dir: Path | None,
    host: str,
    port: int,
    worker_count: int | None,
) -> None:
    """Run the service on this machine: Redis (embedded unless --redis-url), the API and workers.

    \b
    Example:
      queue-service up
      curl -X POST --data hello http://127.0.0.1:8000/api/predict/echo
    Ctrl-C stops every process it started.
    """
    try:
        services = load_services(services_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    for service in services.services:
        if not service.token:
            click.secho(
                f"warning: service {service.name!r} has no token: anyone who can reach {host}:{port} can use it",
                fg="yellow",
                err=True,
            )
    if worker_count is None:
        worker_count = max(service.rpc.worker_threads for service in services.services)

    redis_server: RedisServer | None = None
    if not redis_url:
        try:
            redis_server = RedisServer(data_dir=data_dir, appendonly=data_dir is not None).start()
        except (RedisServerNotFound, RedisServerError) as exc:
            raise click.ClickException(str(exc)) from None
        redis_url = redis_server.url
        click.echo(f"redis-server (embedded) on {redis_url}", err=True)

    env = dict(os.environ, QS_REDIS_URL=redis_url)
    if services_file:
        env["QS_SERVICES"] = str(services_file.resolve())
    else:
        env.pop("QS_SERVICES", None)

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    api = subprocess.Popen(api_command(host, port), env=env)
    workers = [subprocess.Popen(worker_command(redis_url), env=env) for _ in range(worker_count)]
    click.echo(f"API on http://{host}:{port} with {worker_count} worker(s); Ctrl-C stops everything", err=True)
    try:
        while not stopping:
            time.sleep(0.5)
            if api.poll() is not None:
                click.echo(f"the API exited with code {api.returncode}; stopping", err=True)
                break
            for i, worker in enumerate(workers):
                if worker.poll() is not None and not stopping:
                    click.echo(f"worker {worker.pid} exited with code {worker.returncode}; restarting", err=True)
                    time.sleep(RESTART_DELAY_SECONDS)
                    workers[i] = subprocess.Popen(worker_command(redis_url), env=env)
    finally:
        _stop_all([*workers, api], redis_server=redis_server)
        if redis_server is not None:
            redis_server.stop()


def _stop_all(
    processes: list[subprocess.Popen[bytes]], grace: float = 30.0, redis_server: RedisServer | None = None
) -> None:
    """SIGTERM everyone (workers finish the item in hand), then SIGKILL what is left after `grace`.

    The embedded redis-server runs in its own session, so Ctrl-C does not stop it first; but if it
    is gone anyway (killed), a worker would keep retrying to write its result to it, and waiting the
    whole grace would only delay the exit.
    """
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(process.poll() is None for process in processes):
        if redis_server is not None and not redis_server.is_running():
            deadline = min(deadline, time.monotonic() + LOST_REDIS_GRACE_SECONDS)
        time.sleep(0.05)
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


if __name__ == "__main__":
    main()
