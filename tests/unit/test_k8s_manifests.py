"""deploy/k8s/: valid Kubernetes objects (strict schemas, offline, via kubernetes-validate),
wired to each other (selectors, HPA target, probes, GPU request), running textgate commands
that exist, and holding no credentials."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.cli import build_parser
from tests.helpers import REPO_ROOT

MANIFESTS = sorted((REPO_ROOT / "deploy" / "k8s").glob("*.yaml"))
# A version the deployments target; kubernetes-validate bundles its schemas (no network).
KUBERNETES_VERSION = "1.30.0"


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        doc
        for doc in documents()
        if doc["kind"] == kind
        and name in (None, doc["metadata"].get("name"), doc["metadata"].get("generateName"))
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate (the dev extra) validates against the bundled schemas",
    )


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_each_manifest_is_valid_against_the_strict_kubernetes_schemas(
    kubernetes_validate, path: Path
) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda doc: doc["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={}),
        lambda doc: doc["spec"].update(replicas="two"),
        lambda doc: doc["spec"].pop("selector"),
    ],
    ids=["misspelt-field", "wrong-type", "missing-required"],
)
def test_the_schema_check_catches_a_broken_deployment(kubernetes_validate, breakage) -> None:
    doc = copy.deepcopy(find("Deployment", "textgate-serve"))
    breakage(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_serving_is_ready_on_readyz_and_the_service_and_hpa_point_at_it() -> None:
    deployment = find("Deployment", "textgate-serve")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    serve = deployment["spec"]["template"]["spec"]["containers"][0]
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert find("Service", "textgate-serve")["spec"]["selector"].items() <= pod_labels.items()
    target = find("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "textgate-serve")
    assert "cpu" in serve["resources"]["requests"]  # a CPU target needs a request


def test_the_training_job_requests_a_gpu() -> None:
    job = find("Job", "textgate-train-")
    train = job["spec"]["template"]["spec"]["containers"][0]
    assert train["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert train["command"] == ["textgate", "run"]


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_every_textgate_command_in_the_manifests_exists(kind: str) -> None:
    parser = build_parser()
    commands = [
        container["command"]
        for doc in documents()
        if doc["kind"] == kind
        for container in containers(doc)
        if container["command"][0] == "textgate"
    ]
    assert commands
    for command in commands:
        parser.parse_args(command[1:])  # exits (SystemExit) on an unknown command or flag


def test_no_credential_is_written_in_a_manifest() -> None:
    secret_keys = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "TEXTGATE_REGISTRY")
    for doc in documents():
        assert doc["kind"] != "Secret", "secrets are created by hand, never committed"
        for key in secret_keys:
            assert key not in doc.get("data", {}), f"{key} in ConfigMap {doc['metadata']}"
        if doc["kind"] in ("Deployment", "Job"):
            for container in containers(doc):
                for variable in container.get("env", []):
                    assert variable["name"] not in secret_keys or "valueFrom" in variable
