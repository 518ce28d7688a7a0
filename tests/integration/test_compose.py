"""compose.yaml and the Dockerfile, checked where no Docker engine runs.

The compose file is validated against the Compose spec's JSON schema (the copy that
check-jsonschema ships), its `${VAR:-default}` values are read as Compose reads them, and the api
and worker services' commands are run, with their environment, as local processes against a local
redis-server: only the addresses of the container network and the mounted services file's path are
rewritten to local ones.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from jsonschema.validators import validator_for

from queue_service import probe
from queue_service.config import load_services
from queue_service.durations import parse_duration
from queue_service.embedded_redis import RedisServer, free_port
from queue_service.testing import ManagedProcess, wait_until_ready, write_services
from tests.support.repo import REPO_ROOT
from tests.support.slow_start import LOADING_ENV

pytestmark = pytest.mark.integration

COMPOSE_FILE = REPO_ROOT / "compose.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
# The programs of the services' commands: the console scripts the project's dependencies install.
VENV_BIN = Path(sys.executable).parent
APP_SERVICES = ("api", "worker", "webhooks")
SLOW_START = "tests.support.slow_start:SlowStart"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    return compose["services"][name]


def environment(spec: dict[str, Any]) -> dict[str, str]:
    """A service's environment, from either of the spec's forms (mapping or KEY=VALUE list)."""
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    # A key without a value is passed on from the shell that runs Compose (here: not set).
    return {key: str(value) for key, value in env.items() if value is not None}


# Compose's interpolation: `$$` is a literal `$`; `${VAR:-default}` / `${VAR-default}` / `${VAR}` / `$VAR`.
_INTERPOLATION = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?-)([^}]*))?\}|(\w+))")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """A value of the compose file as Compose makes it, with `env` as the shell's (and .env's) variables."""
    env = env or {}

    def one(match: re.Match[str]) -> str:
        dollar, name, operator, default, bare = match.groups()
        if dollar:
            return "$"
        if bare:
            return env.get(bare, "")
        if operator == ":-":
            return env.get(name) or default
        if operator == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _INTERPOLATION.sub(one, value)


def command_of(spec: dict[str, Any]) -> list[str]:
    """The service's command as the container runs it; a `sh -c` script becomes the words of its exec."""
    argv = [interpolate(arg) for arg in spec["command"]]
    if argv[:2] == ["sh", "-c"]:
        words = shlex.split(argv[2])
        return words[1:] if words[0] == "exec" else words
    return argv


def bind_mounts(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The service's bind mounts (long syntax), by target path in the container."""
    return {v["target"]: v for v in spec.get("volumes", []) if isinstance(v, dict) and v.get("type") == "bind"}


# --- the compose file --------------------------------------------------------------------


def compose_spec_errors(document: Any) -> list[str]:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = validator_for(schema)(schema)
    return [
        f"{'/'.join(str(part) for part in error.absolute_path) or '(top)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_compose_file_follows_the_compose_spec(compose: dict[str, Any]) -> None:
    assert compose_spec_errors(compose) == []


def test_the_spec_check_catches_a_misspelt_key(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["stop_grace_perod"] = broken["services"]["worker"].pop("stop_grace_period")
    assert any("stop_grace_perod" in error for error in compose_spec_errors(broken))


def test_redis_keeps_its_data_with_aof_in_a_named_volume(compose: dict[str, Any]) -> None:
    spec = service(compose, "redis")
    assert spec["image"].startswith("redis:7")
    command = spec["command"]
    assert command[0] == "redis-server"
    assert "--appendonly" in command
    assert command[command.index("--appendonly") + 1] == "yes"
    volume, _, target = spec["volumes"][0].partition(":")
    assert target == "/data"
    assert volume in compose["volumes"]
    assert spec["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_api_and_worker_wait_for_a_healthy_redis_and_share_the_mounted_services_file(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        spec = service(compose, name)
        assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
        env = environment(spec)
        assert env["QS_REDIS_URL"] == "redis://redis:6379/0"
        mount = bind_mounts(spec)[env["QS_SERVICES"]]
        assert mount["read_only"] is True
        source = (COMPOSE_FILE.parent / mount["source"]).resolve()
        assert source == (REPO_ROOT / "examples" / "services.yaml").resolve()
        names = [s.name for s in load_services(source).services]
        assert {"echo", "sleep", "language-id"} <= set(names)


def test_published_ports_listen_on_loopback_unless_the_environment_says_otherwise(compose: dict[str, Any]) -> None:
    published = {name: spec["ports"] for name, spec in compose["services"].items() if "ports" in spec}
    assert set(published) == {"api", "rq-dashboard"}
    for ports in published.values():
        for port in ports:
            # host address:host port:container port; a bare "8000:8000" would listen on every interface.
            assert interpolate(port).split(":")[0] == "127.0.0.1", port
    api_port = published["api"][0]
    assert interpolate(api_port) == "127.0.0.1:8000:8000"
    assert interpolate(api_port, {"QS_API_ADDRESS": "0.0.0.0", "QS_API_PORT": "9000"}) == "0.0.0.0:9000:8000"
    dashboard_port = published["rq-dashboard"][0]
    assert interpolate(dashboard_port, {"QS_RQ_DASHBOARD_PORT": "9999"}) == "127.0.0.1:9999:9181"
    command = service(compose, "api")["command"]
    assert command[command.index("--port") + 1] == "8000"


def test_api_healthcheck_is_a_plain_http_get_of_readiness(compose: dict[str, Any]) -> None:
    check = service(compose, "api")["healthcheck"]
    # The stdlib probe, not `queue-service health` (which imports the whole CLI and timed out under load).
    assert check["test"][:4] == ["CMD", "python", "-m", "queue_service.probe"]
    assert check["test"][4].endswith("/readyz?scope=api")
    assert parse_duration(check["timeout"]) > probe.TIMEOUT_SECONDS


def test_one_redis_setting_serves_the_api_the_workers_and_rq_dashboard(compose: dict[str, Any]) -> None:
    url = environment(service(compose, "api"))["QS_REDIS_URL"]
    assert environment(service(compose, "worker"))["QS_REDIS_URL"] == url
    assert environment(service(compose, "rq-dashboard"))["RQ_DASHBOARD_REDIS_URL"] == url
    # rq's command line connects before our worker class runs: it must be told the same URL, not its default.
    worker = command_of(service(compose, "worker"))
    assert worker[worker.index("--url") + 1] == "$QS_REDIS_URL"
    assert "redis://" not in " ".join(service(compose, "worker")["command"])


def test_the_app_image_is_built_once_and_only_processes_without_a_handler_get_an_init(compose: dict[str, Any]) -> None:
    app = [name for name, spec in compose["services"].items() if spec.get("image") == "queue-service:local"]
    assert sorted(app) == ["api", "webhooks", "worker"]
    assert [name for name in app if "build" in service(compose, name)] == ["api"]
    assert service(compose, "worker")["pull_policy"] == service(compose, "webhooks")["pull_policy"] == "never"
    # The API, our worker and the webhook dispatcher handle SIGTERM themselves; rq-dashboard does not, and
    # as PID 1 would ignore it.
    assert service(compose, "rq-dashboard")["init"] is True
    assert not any(service(compose, name).get("init") for name in APP_SERVICES)


def test_worker_stops_gracefully_and_can_be_scaled(compose: dict[str, Any]) -> None:
    spec = service(compose, "worker")
    assert spec["stop_signal"] == "SIGTERM"
    # Docker's default of 10 s would kill a worker in the middle of a long inference.
    assert parse_duration(spec["stop_grace_period"]) >= 60
    # `docker compose up --scale worker=4` needs replicas that do not clash.
    assert not {"container_name", "ports", "hostname"} & set(spec)


def test_dashboard_runs_only_with_its_profile(compose: dict[str, Any]) -> None:
    assert service(compose, "rq-dashboard")["profiles"] == ["dashboard"]
    for name in ("redis", *APP_SERVICES):
        assert "profiles" not in service(compose, name)


# --- the Dockerfile ----------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


def dockerfile_instructions() -> list[Instruction]:
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return instructions


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching rule wins)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rule in DOCKERIGNORE.read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule.removeprefix("!").strip("/")
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_dockerfile_needs_no_frontend_image() -> None:
    # A `# syntax=` line makes BuildKit pull a frontend image first: offline, the build fails.
    assert not any(line.lstrip().lower().startswith("# syntax=") for line in DOCKERFILE.read_text().splitlines())


def test_rq_dashboard_image_installs_what_rq_dashboard_imports_without_declaring() -> None:
    stage = DOCKERFILE.read_text().split("AS rq-dashboard", 1)[1].split("FROM ", 1)[0]
    assert '"rq-dashboard~=0.9.0"' in stage and "six" in stage


def test_dockerfile_copies_paths_that_exist_and_reach_the_build_context() -> None:
    copies = [shlex.split(i.args) for i in dockerfile_instructions() if i.keyword == "COPY"]
    local = [args for args in copies if not any(arg.startswith("--from") for arg in args)]
    assert local, "the Dockerfile copies the project in"
    for args in local:
        for source in [arg for arg in args[:-1] if not arg.startswith("--")]:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path in the repository"
            assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"
    # Mounted at run time, never baked in; and no tests or caches in the context.
    for outside in ("examples/services.yaml", "tests/conftest.py", ".git", ".cache"):
        assert dockerignored(outside), f"{outside} should stay out of the build context"


def test_dockerfile_builds_the_compose_targets_from_python_slim_as_a_non_root_user(compose: dict[str, Any]) -> None:
    instructions = dockerfile_instructions()
    stages = [shlex.split(i.args) for i in instructions if i.keyword == "FROM"]
    assert all(stage[0] == "python:3.11-slim" for stage in stages)
    names = [stage[2] for stage in stages if len(stage) == 3 and stage[1].upper() == "AS"]
    for spec in compose["services"].values():
        if "build" in spec:
            assert spec["build"]["target"] in names
    # `docker build .` without a target gives the app, the last stage.
    assert names[-1] == "app"
    last_from = max(n for n, i in enumerate(instructions) if i.keyword == "FROM")
    app = instructions[last_from:]
    users = [i.args for i in app if i.keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}
    installs = " ".join(i.args for i in instructions if i.keyword == "RUN" and "pip" in i.args)
    assert '".[examples]"' in installs and "queue-service[examples]" in installs
    assert "[test]" not in installs and ",test" not in installs


def test_the_services_commands_are_installed_by_the_project(compose: dict[str, Any]) -> None:
    requirements = " ".join(metadata.requires("queue-service") or [])
    assert "rq" in requirements
    console = metadata.entry_points(group="console_scripts")
    scripts = {entry.name for entry in console if entry.value.startswith("queue_service")}
    for name, program in (("api", "queue-service"), ("worker", "rq"), ("webhooks", "queue-service")):
        assert command_of(service(compose, name))[0] == program
        assert program == "rq" or program in scripts, f"{program} is not a console script of the project"
        assert shutil.which(program, path=str(VENV_BIN)), f"{program} is not installed in {VENV_BIN}"
    assert command_of(service(compose, "api"))[1] == "api" and command_of(service(compose, "webhooks"))[1] == "webhooks"


# --- the api and worker commands, run as local processes ----------------------------------


def localize(compose: dict[str, Any], name: str, redis_url: str, api_port: int) -> tuple[list[str], dict[str, str]]:
    """The service's command and environment, with container addresses and paths made local.

    A `sh -c` command runs under sh as in the container (the script reads the environment); the venv's
    programs come first on its PATH."""
    spec = service(compose, name)
    compose_redis = environment(service(compose, "api"))["QS_REDIS_URL"]
    mounts = {target: str((COMPOSE_FILE.parent / m["source"]).resolve()) for target, m in bind_mounts(spec).items()}

    def local(value: str) -> str:
        return redis_url if value == compose_redis else mounts.get(value, value)

    argv = [local(interpolate(arg)) for arg in spec["command"]]
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(api_port))):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
    argv[0] = shutil.which(argv[0], path=str(VENV_BIN)) or argv[0]
    env = {key: local(interpolate(value)) for key, value in environment(spec).items()}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    assert "redis:6379" not in " ".join(argv + list(env.values()))
    return argv, env


def run_healthcheck(compose: dict[str, Any], name: str, base_url: str) -> subprocess.CompletedProcess[str]:
    kind, *test = service(compose, name)["healthcheck"]["test"]
    argv = ["sh", "-c", test[0]] if kind == "CMD-SHELL" else test
    argv = [arg.replace("http://127.0.0.1:8000", base_url) for arg in argv]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, check=False)


@dataclass
class LocalStack:
    api: ManagedProcess
    worker: ManagedProcess
    base_url: str
    token: str


@pytest.fixture
def local_stack(compose: dict[str, Any], redis_server: RedisServer, tmp_path: Path) -> Iterator[LocalStack]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    api_argv, api_env = localize(compose, "api", redis_server.url, port)
    worker_argv, worker_env = localize(compose, "worker", redis_server.url, port)
    token = load_services(api_env["QS_SERVICES"]).by_name["echo"].token or ""
    processes: list[ManagedProcess] = []
    try:
        api = ManagedProcess(api_argv, name="compose-api", env=api_env, log_dir=tmp_path)
        processes.append(api)
        wait_until_ready(api, lambda: _status(f"{base_url}/readyz?scope=api") == 200, 60, "ready on /readyz")
        worker = ManagedProcess(worker_argv, name="compose-worker", env=worker_env, log_dir=tmp_path)
        processes.append(worker)
        # It loads every processor of examples/services.yaml, the language model too: 30 s seen on a loaded box.
        wait_until_ready(worker, lambda: _workers_serve_all(base_url), 120, "live for every service")
        yield LocalStack(api, worker, base_url, token)
    finally:
        for process in reversed(processes):
            process.stop()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def _workers_serve_all(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/readyz", timeout=2).json()["services_without_workers"] == []
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def put_and_read_result(stack: LocalStack, service_name: str, body: bytes) -> bytes:
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": stack.token}, timeout=30) as http:
        put = http.post(f"/api/predict/{service_name}", content=body)
        assert put.status_code == 200, put.text
        request_id = put.headers["X-Eas-Queueservice-Request-Id"]
        result = http.get(
            f"/api/predict/{service_name}/sink", params={"requestId": request_id, "_raw_": "true", "_timeout_": "20s"}
        )
    assert result.status_code == 200, f"no result; worker log:\n{stack.worker.log_tail()}"
    return result.content


def test_compose_api_and_worker_commands_process_a_request_together(
    compose: dict[str, Any], local_stack: LocalStack
) -> None:
    assert put_and_read_result(local_stack, "echo", b"hello from compose") == b"hello from compose"
    # The image installs the `examples` extra: the LanguageId model loads in the worker.
    language = json.loads(put_and_read_result(local_stack, "language-id", b"The quick brown fox jumps over the dog."))
    assert language["language"] == "en"
    assert run_healthcheck(compose, "api", local_stack.base_url).returncode == 0


def test_compose_worker_finishes_the_item_in_hand_on_its_stop_signal(
    compose: dict[str, Any], local_stack: LocalStack
) -> None:
    headers = {"Authorization": local_stack.token}
    with httpx.Client(base_url=local_stack.base_url, headers=headers, timeout=30) as http:
        put = http.post("/api/predict/sleep", content=b"1.5")
        index, request_id = put.text, put.headers["X-Eas-Queueservice-Request-Id"]
        deadline = time.monotonic() + 20
        while not http.get("/api/predict/sleep", params={"_search_": "true", "_index_": index}).json()["IsPending"]:
            assert time.monotonic() < deadline, "the worker never took the item"
            time.sleep(0.05)
        local_stack.worker.terminate()  # compose's stop_signal is SIGTERM
        grace = parse_duration(service(compose, "worker")["stop_grace_period"])
        assert local_stack.worker.wait(timeout=min(grace, 30)) == 0, local_stack.worker.log_tail()
        result = http.get("/api/predict/sleep/sink", params={"requestId": request_id, "_raw_": "true"})
    assert result.status_code == 200 and json.loads(result.content) == {"slept": 1.5}


def test_compose_api_healthcheck_fails_when_redis_is_gone(
    compose: dict[str, Any], local_stack: LocalStack, redis_server: RedisServer
) -> None:
    assert run_healthcheck(compose, "api", local_stack.base_url).returncode == 0
    redis_server.stop()
    failed = run_healthcheck(compose, "api", local_stack.base_url)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "not ready" in failed.stderr


def test_compose_worker_exits_promptly_on_a_stop_while_its_processor_loads(
    compose: dict[str, Any], redis_server: RedisServer, tmp_path: Path
) -> None:
    # `docker compose stop` (or a rollout) while a model loads: without a handler of its own the worker,
    # PID 1 in its container, ignored the SIGTERM and was SIGKILLed after the whole grace period.
    services = write_services(tmp_path / "services.yaml", [{"name": "slow", "processor": SLOW_START}])
    argv, env = localize(compose, "worker", redis_server.url, free_port())
    loading = tmp_path / "loading"
    env |= {"QS_SERVICES": str(services), LOADING_ENV: str(loading)}
    worker = ManagedProcess(argv, name="compose-worker", env=env, log_dir=tmp_path, cwd=REPO_ROOT)
    try:
        wait_until_ready(worker, loading.exists, 60, "loading its processor")
        stopped_at = time.monotonic()
        worker.terminate()  # SIGTERM, compose's stop_signal
        code = worker.wait(timeout=30)
        took = time.monotonic() - stopped_at
    finally:
        worker.stop()
    assert code == 0, worker.log_tail()
    assert took < 10, f"exited {took:.1f} s after SIGTERM"
    assert "stopped while loading" in worker.log_text()


def test_compose_webhook_dispatcher_serves_the_services_and_stops_on_its_stop_signal(
    compose: dict[str, Any], redis_server: RedisServer, tmp_path: Path
) -> None:
    argv, env = localize(compose, "webhooks", redis_server.url, free_port())
    dispatcher = ManagedProcess(argv, name="compose-webhooks", env=env, log_dir=tmp_path, cwd=REPO_ROOT)
    try:
        wait_until_ready(dispatcher, lambda: "webhook dispatcher" in dispatcher.log_text(), 60, "serving")
        assert "echo" in dispatcher.log_text()  # it read the mounted services file, and reached Redis
        dispatcher.terminate()  # SIGTERM, compose's stop_signal
        code = dispatcher.wait(timeout=30)
    finally:
        dispatcher.stop()
    assert code == 0, dispatcher.log_tail()
