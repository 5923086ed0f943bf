"""The Kubernetes manifests are valid objects and a coherent deployment."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from flotilla.config import FlotillaSettings

MANIFESTS = Path(__file__).resolve().parents[1] / "k8s" / "flotilla.yaml"


def documents() -> list[dict]:  # type: ignore[type-arg]
    return [d for d in yaml.safe_load_all(MANIFESTS.read_text()) if d]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_object_is_valid_against_the_api_schema(doc: dict) -> None:  # type: ignore[type-arg]
    kubernetes_validate.validate(doc, "1.30", strict=True)


def test_configuration_loads_and_names_only_defined_services() -> None:
    docs = documents()
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "flotilla-config")
    settings = FlotillaSettings(**yaml.safe_load(config_map["data"]["flotilla.yaml"]))
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    addresses = [settings.endpoints.router, settings.endpoints.controller, *settings.endpoints.preprocess,
                 *settings.endpoints.triton]
    addresses += [a for batchers in settings.endpoints.batchers.values() for a in batchers]
    for address in addresses:
        host = address.rsplit(":", 1)[0]
        assert any(part in services for part in host.split(".")), f"{address} names no Service in {MANIFESTS.name}"
    assert set(settings.endpoints.batchers) == set(settings.models)


def test_every_flotilla_container_has_grpc_probes_and_runs_a_configured_role() -> None:
    for doc in documents():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            if not container["image"].startswith("flotilla:"):
                continue
            assert container["args"][:2][0] == "serve" and container["args"][1] in {"router", "batcher", "preprocess", "controller"}
            assert "grpc" in container["readinessProbe"] and "grpc" in container["livenessProbe"]
