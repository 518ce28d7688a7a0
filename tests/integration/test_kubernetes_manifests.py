"""examples/kubernetes/ is valid Kubernetes and KEDA, and says what docs/scaling.md promises.

Core objects are checked against the Kubernetes JSON schemas in strict mode (no unknown field) by the
`kubernetes-validate` package; KEDA's ScaledObject and TriggerAuthentication against KEDA's CRD models
(`cloudcoil-models-keda`), with nothing dropped in the round trip. Then what a user relies on: readiness on
`/readyz?scope=api`, workers scaled from zero on their service's input streams, a termination grace above
the workers' stop grace, budgets that select the pods, and a services file and Redis URL we can read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication

from queue_service.config import parse_services
from queue_service.store import keys
from queue_service.store.connection import parse_url
from tests.support.repo import REPO_ROOT

MANIFESTS = REPO_ROOT / "examples" / "kubernetes"
KUBERNETES_VERSION = "1.32.0"
KEDA_MODELS = {"ScaledObject": ScaledObject, "TriggerAuthentication": TriggerAuthentication}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


DOCUMENTS = _documents()
BY_KIND: dict[str, list[dict[str, Any]]] = {}
for _, document in DOCUMENTS:
    BY_KIND.setdefault(document["kind"], []).append(document)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


@pytest.mark.parametrize(("name", "document"), DOCUMENTS, ids=[name for name, _ in DOCUMENTS])
def test_each_manifest_is_valid_against_its_schema(name: str, document: dict[str, Any]) -> None:
    model = KEDA_MODELS.get(document["kind"])
    if model is None:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        return
    parsed = model.model_validate(document)
    # The models ignore unknown fields: a misspelt one would vanish here, so the round trip must keep all.
    assert _without_nulls(parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")) == document


def _deployment(component: str) -> dict[str, Any]:
    [found] = [d for d in BY_KIND["Deployment"] if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return found


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_the_api_is_ready_when_it_reaches_redis_and_drains_before_it_stops() -> None:
    api = _container(_deployment("api"))
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz?scope=api"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "preStop" in api["lifecycle"]


def test_workers_scale_from_zero_on_their_services_input_streams() -> None:
    worker = _deployment("worker")
    [scaled] = BY_KIND["ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 0
    service = _container(worker)["command"][-1]
    triggers = scaled["spec"]["triggers"]
    assert {t["metadata"]["stream"] for t in triggers} == set(keys.input_queue(service).streams)
    assert all(t["metadata"]["consumerGroup"] == keys.WORKER_GROUP for t in triggers)
    # Waiting items wake it from zero; held items keep busy workers.
    assert any(t["metadata"].get("activationLagCount") == "0" for t in triggers)
    assert any("pendingEntriesCount" in t["metadata"] for t in triggers)


def test_a_stopping_worker_has_time_to_finish_or_hand_back_its_item() -> None:
    worker = _deployment("worker")
    env = {e["name"]: e["value"] for e in _container(worker)["env"]}
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > int(env["QS_SHUTDOWN_GRACE_SECONDS"])
    assert "-c" in _container(worker)["command"]  # rq reads QS_REDIS_URL: no URL on the command line


def test_each_budget_selects_the_pods_of_a_deployment() -> None:
    templates = [d["spec"]["template"]["metadata"]["labels"] for d in BY_KIND["Deployment"]]
    for budget in BY_KIND["PodDisruptionBudget"]:
        wanted = budget["spec"]["selector"]["matchLabels"]
        assert any(wanted.items() <= labels.items() for labels in templates), budget["metadata"]["name"]


def test_the_services_file_and_the_redis_url_are_ones_we_read() -> None:
    [config] = BY_KIND["ConfigMap"]
    services = parse_services(yaml.safe_load(config["data"]["services.yaml"]), "ConfigMap")
    assert _container(_deployment("worker"))["command"][-1] in services.by_name
    [secret] = BY_KIND["Secret"]
    assert parse_url(secret["stringData"]["QS_REDIS_URL"]).kind == "sentinel"


def test_the_manifests_directory_is_what_the_docs_name() -> None:
    assert MANIFESTS.is_dir()
    docs = (REPO_ROOT / "docs" / "scaling.md").read_text()
    for path in MANIFESTS.glob("*.yaml"):
        assert f"examples/kubernetes/{Path(path).name}" in docs
