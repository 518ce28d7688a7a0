"""`queue-service webhooks`: run a dispatcher; `webhooks dead` lists dead letters, `webhooks retry` sends them again.

These talk to Redis (QS_REDIS_URL), like the workers: they are the operator's, not a client's.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from queue_service.config import ConfigError, ServicesFile, Settings, load_services
from queue_service.logs import configure_logging
from queue_service.store import connection
from queue_service.store.deliveries import DeliveryStore
from queue_service.webhooks.dispatcher import IDLE_WAIT_SECONDS, Dispatcher

T = TypeVar("T")


def _setup(services_file: Path | None, redis_url: str | None) -> tuple[ServicesFile, str]:
    settings = Settings()
    try:
        services = load_services(services_file or settings.services)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return services, redis_url or settings.redis_url


def _with_store(redis_url: str, work: Callable[[DeliveryStore], Awaitable[T]]) -> T:
    async def main() -> T:
        client = connection.blocking_client(redis_url, IDLE_WAIT_SECONDS)
        try:
            return await work(DeliveryStore(client))
        finally:
            await client.aclose()

    return asyncio.run(main())


services_option = click.option(
    "--services",
    "services_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="QS_SERVICES",
    help="Services file (YAML). Default: the built-in one.",
)
redis_option = click.option("--redis-url", envvar="QS_REDIS_URL", help="Redis (default: QS_REDIS_URL).")


@click.group(invoke_without_command=True)
@services_option
@redis_option
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=1024),
    default=16,
    show_default=True,
    help="Attempts at once per service.",
)
@click.pass_context
def webhooks(ctx: click.Context, services_file: Path | None, redis_url: str | None, concurrency: int) -> None:
    """Send the services' webhook deliveries (a dispatcher), until SIGTERM or Ctrl-C.

    Several dispatchers share the work; one that dies leaves what it held to the others (sent again after its
    lease, with the same webhook id). `queue-service up` runs one.

    \b
    Examples:
      QS_SERVICES=services.yaml QS_REDIS_URL=redis://redis:6379/0 queue-service webhooks
      queue-service webhooks dead -s llm
      queue-service webhooks retry -s llm --all
    """
    ctx.obj = (services_file, redis_url)
    if ctx.invoked_subcommand is not None:
        return
    services, url = _setup(services_file, redis_url)
    configure_logging()
    public_url = Settings().public_url

    async def run(store: DeliveryStore) -> None:
        dispatcher = Dispatcher(store, services, concurrency=concurrency, public_url=public_url)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, dispatcher.stop)
        await dispatcher.run()

    _with_store(url, run)


@webhooks.command()
@click.option("--service", "-s", required=True, help="Service name.")
@click.option("--most", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def dead(obj: tuple[Path | None, str | None], service: str, most: int, as_json: bool) -> None:
    """List a service's dead letters (deliveries whose last attempt failed), newest first."""
    services, url = _setup(*obj)
    if service not in services.by_name:
        raise click.ClickException(f"no such service: {service}")
    letters = _with_store(url, lambda store: store.dead_letters(service, most))
    for letter in letters:
        if as_json:
            click.echo(json.dumps(_letter_json(letter)))
        else:
            when = datetime.fromtimestamp(letter.dead_at_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
            why = f"status {letter.last_status}" if letter.last_status else letter.last_error
            click.echo(
                f"{letter.entry_id}\t{when}Z\t{letter.event}\t{letter.request_id}\t{letter.url or '(service url)'}"
                f"\t{letter.attempts} attempts, last: {why}"
            )
    if not letters and not as_json:
        click.echo(f"{service}: no dead letters", err=True)


def _letter_json(letter: Any) -> dict[str, Any]:
    return {
        "entryId": letter.entry_id,
        "webhookId": letter.webhook_id,
        "requestId": letter.request_id,
        "event": letter.event,
        "url": letter.url,
        "deadAt": letter.dead_at_ms,
        "attempts": letter.attempts,
        "lastStatus": letter.last_status,
        "lastError": letter.last_error,
    }


@webhooks.command()
@click.option("--service", "-s", required=True, help="Service name.")
@click.option("--all", "everything", is_flag=True, help="Every dead letter of the service.")
@click.argument("entry_ids", nargs=-1)
@click.pass_obj
def retry(obj: tuple[Path | None, str | None], service: str, everything: bool, entry_ids: tuple[str, ...]) -> None:
    """Send dead letters again (ENTRY_IDs from `webhooks dead`, or --all), with the same webhook ids."""
    if bool(entry_ids) == everything:
        raise click.UsageError("give ENTRY_IDs or --all")
    services, url = _setup(*obj)
    if service not in services.by_name:
        raise click.ClickException(f"no such service: {service}")
    revived = _with_store(url, lambda store: store.revive(service, entry_ids))
    click.echo(f"{service}: {revived} dead letter{'' if revived == 1 else 's'} sent again")
