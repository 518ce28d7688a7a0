"""The services file: a bad one is refused at start-up with the key named; a good one is typed settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from queue_service.config import ConfigError, Settings, load_services, parse_services
from tests.conftest import ServicesFileFactory


def echo(**settings: Any) -> dict[str, Any]:
    return {"name": "echo", "processor": "workers.examples:Echo", **settings}


def refusal(raw: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_services(raw)
    return str(caught.value)


def test_a_minimal_service_gets_the_platform_defaults() -> None:
    (service,) = parse_services({"services": [echo()]}).services

    assert service.token is None
    assert (service.rpc.keepalive, service.rpc.worker_threads, service.rpc.max_queue_size) == (5000, 5, 64)
    assert service.rpc.rate_limit == 0
    assert service.queue.max_delivery == 3
    assert service.max_payload_bytes == 8 * 1024 * 1024


def test_settings_are_read_from_the_services_file(services_file: ServicesFileFactory) -> None:
    path = services_file(
        [
            echo(token="s3cret", metadata={"rpc": {"max_queue_size": 10, "keepalive": 2000}}),
            {
                "name": "slow",
                "processor": "workers.examples:Sleep",
                "queue": {"max_delivery": 1, "lease_seconds": 30, "sink": {"max_length": 100}},
            },
        ]
    )

    services = load_services(path).by_name

    assert services["echo"].token == "s3cret"
    assert (services["echo"].rpc.max_queue_size, services["echo"].rpc.keepalive) == (10, 2000)
    assert services["slow"].queue.max_delivery == 1
    assert services["slow"].queue.lease_seconds == 30
    assert services["slow"].queue.sink.max_length == 100


def test_an_unknown_key_is_refused_naming_its_path() -> None:
    message = refusal({"services": [echo(), echo(name="b", metadata={"rpc": {"max_queue_sise": 10}})]})

    assert "services.1.metadata.rpc.max_queue_sise" in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"metadata": {"rpc": {"max_queue_size": 0}}}, "services.0.metadata.rpc.max_queue_size"),
        ({"metadata": {"rpc": {"worker_threads": 0}}}, "services.0.metadata.rpc.worker_threads"),
        ({"metadata": {"rpc": {"keepalive": "soon"}}}, "services.0.metadata.rpc.keepalive"),
        ({"metadata": {"rpc": {"rate_limit": -1}}}, "services.0.metadata.rpc.rate_limit"),
        ({"queue": {"max_delivery": 0}}, "services.0.queue.max_delivery"),
        ({"queue": {"lease_seconds": 0.5}}, "services.0.queue.lease_seconds"),
        ({"queue": {"max_payload_size_kb": -1}}, "services.0.queue.max_payload_size_kb"),
        ({"queue": {"sink": {"max_length": 0}}}, "services.0.queue.sink.max_length"),
        ({"name": "sink"}, "services.0.name"),
        ({"name": "a/b"}, "services.0.name"),
        ({"name": ""}, "services.0.name"),
        ({"processor": "workers.examples"}, "services.0.processor"),
    ],
)
def test_a_bad_value_is_refused_naming_its_key(settings: dict[str, Any], key: str) -> None:
    assert f"{key}: " in refusal({"services": [echo(**settings)]})


def test_a_service_without_a_processor_or_an_upstream_is_refused() -> None:
    assert "services.0: Value error, a service needs `processor`" in refusal({"services": [{"name": "echo"}]})


def test_every_problem_is_named_at_once() -> None:
    message = refusal({"services": [echo(metadata={"rpc": {"max_queue_size": 0, "worker_threads": 0}})]})

    assert "max_queue_size" in message
    assert "worker_threads" in message


def test_a_service_name_used_twice_is_refused() -> None:
    assert "'echo' is used twice" in refusal({"services": [echo(), echo(processor="workers.examples:Sleep")]})


@pytest.mark.parametrize("raw", [{"services": []}, {}, None, ["echo"]])
def test_a_file_without_services_is_refused(raw: Any) -> None:
    refusal(raw)


def test_the_default_services_file_is_one_open_echo_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QS_SERVICES", raising=False)

    (service,) = Settings().load_services().services

    assert (service.name, service.processor, service.token) == ("echo", "workers.examples:Echo", None)
    assert load_services(None) == Settings().load_services()


def test_the_services_file_is_named_by_qs_services(
    monkeypatch: pytest.MonkeyPatch, services_file: ServicesFileFactory
) -> None:
    monkeypatch.setenv("QS_SERVICES", str(services_file([echo(name="from-env")])))

    assert list(Settings().load_services().by_name) == ["from-env"]


def test_a_bad_services_file_is_refused_naming_the_file(services_file: ServicesFileFactory) -> None:
    path = services_file([echo(metadata={"rpc": {"max_queue_size": 0}})])

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: services\.0\.metadata\.rpc\.max_queue_size"):
        load_services(path)


def test_a_missing_services_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read services file"):
        load_services(tmp_path / "absent.yaml")


def test_a_services_file_that_is_not_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("services: [\n  - name: echo\n")

    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_services(path)
