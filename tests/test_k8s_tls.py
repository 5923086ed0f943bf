"""The TLS component (k8s/components/tls) and its example overlay, cpu-tls: every hop with certificates.

``k8s/overlays/cpu-tls`` (the cpu overlay plus the component) is rendered with ``kubectl kustomize`` as
``tests/test_k8s_manifests.py`` renders the others, and goes through that file's checks (resources,
hardened contexts, roles, budgets, HPAs, policies, monitors...) where TLS changes nothing. Then what
TLS adds: cert-manager's objects checked against a minimal schema of their CRDs (kubernetes-validate
has none, and nothing is fetched); a CA bootstrapped by a self-signed Issuer that signs every other
Certificate; every Flotilla container with its workload's Certificate mounted where ``tls.*_file``
point, TLS on in the settings its environment gives, and its probes on the plaintext health port;
Triton's gRPC with mutual TLS on files its mount holds; MinIO's certificate where it looks for one;
the admin client certificate's identity; and the plain cpu overlay unchanged by all of it.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

import tests.test_k8s_manifests as manifests
from flotilla import k8s
from flotilla.config import FlotillaSettings
from tests.test_k8s_manifests import (
    CRD_GROUP,
    FLOTILLA_IMAGE,
    K8S,
    K8S_VERSION,
    Obj,
    kustomize,
    label,
    named,
    objects,
    pod_specs,
    rendered,
    rendered_with_dedicated_batcher,
    selects,
)

OVERLAY = "cpu-tls"
PLAIN = "cpu"
CERT_MANAGER = "cert-manager.io/v1"
CA_ISSUER = "flotilla-ca"
TLS_DIR = "/etc/flotilla/tls"
HEALTH_PORT = 8086
TLS_ENV = {
    "FLOTILLA_TLS__ENABLED": "true",
    "FLOTILLA_TLS__HEALTH_PORT": str(HEALTH_PORT),
    "FLOTILLA_S3__SECURE": "true",
    "FLOTILLA_PREPROCESS__TRITON_PROTOCOL": "grpc",
    "FLOTILLA_TLS__SERVER_NAME": "flotilla-mesh",
}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
SECRET_KEYS = {"ca.crt", "tls.crt", "tls.key"}
"""cert-manager's Secret layout: what tls.ca_file, cert_file and key_file name by default."""
TIER_SECRETS = {
    "router": "flotilla-router-tls",
    "controller": "flotilla-controller-tls",
    "batcher": "flotilla-batcher-tls",
    "preprocess": "flotilla-preprocess-tls",
}
"""Each Flotilla tier's Certificate Secret (every batcher Deployment, shard or dedicated, shares one)."""

# --- cert-manager's objects: the fields of its v1 CRDs these manifests may use --------------------

_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"}
_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}
_USAGES = ["signing", "digital signature", "content commitment", "key encipherment", "key agreement",
           "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
           "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
           "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                   "namespace": {"type": "string"}, "labels": _LABELS, "annotations": _LABELS},
    "additionalProperties": False,
}
_ISSUER_REF = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                   "group": {"type": "string"}},
    "additionalProperties": False,
}
CERT_MANAGER_SCHEMAS: dict[str, dict[str, Any]] = {
    "Certificate": {
        "type": "object",
        "required": ["secretName", "issuerRef"],
        "properties": {
            "secretName": {"type": "string"},
            "secretTemplate": {"type": "object", "properties": {"labels": _LABELS, "annotations": _LABELS},
                               "additionalProperties": False},
            "commonName": {"type": "string", "maxLength": 64},
            "subject": {"type": "object", "additionalProperties": _STRINGS},
            "dnsNames": _STRINGS,
            "ipAddresses": _STRINGS,
            "uris": _STRINGS,
            "emailAddresses": _STRINGS,
            "duration": _DURATION,
            "renewBefore": _DURATION,
            "isCA": {"type": "boolean"},
            "usages": {"type": "array", "items": {"enum": _USAGES}},
            "privateKey": {
                "type": "object",
                "properties": {"algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": {"type": "integer"},
                               "encoding": {"enum": ["PKCS1", "PKCS8"]},
                               "rotationPolicy": {"enum": ["Never", "Always"]}},
                "additionalProperties": False,
            },
            "issuerRef": _ISSUER_REF,
            "revisionHistoryLimit": {"type": "integer"},
        },
        "additionalProperties": False,
    },
    "Issuer": {
        "type": "object",
        "properties": {
            "selfSigned": {"type": "object", "properties": {"crlDistributionPoints": _STRINGS},
                           "additionalProperties": False},
            "ca": {"type": "object", "required": ["secretName"],
                   "properties": {"secretName": {"type": "string"}, "crlDistributionPoints": _STRINGS,
                                  "ocspServers": _STRINGS, "issuingCertificateURL": _STRINGS},
                   "additionalProperties": False},
        },
        "minProperties": 1,
        "maxProperties": 1,  # exactly one kind of issuer
        "additionalProperties": False,
    },
}
"""A subset of cert-manager v1's CRD schemas, strict: a misspelt field (``dnsName``, ``renewbefore``) or
an unknown usage fails here, not when cert-manager's webhook refuses the apply."""


def check_cert_manager_object(obj: Obj) -> None:
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}, label(obj)
    assert obj["kind"] in CERT_MANAGER_SCHEMAS, f"unexpected cert-manager kind {obj['kind']}"
    jsonschema.validate(obj["metadata"], _METADATA)
    jsonschema.validate(obj["spec"], CERT_MANAGER_SCHEMAS[obj["kind"]])


def certificates(overlay: str = OVERLAY) -> dict[str, Obj]:
    """secretName -> its Certificate."""
    return {c["spec"]["secretName"]: c for c in objects(overlay, "Certificate")}


def issuers(overlay: str = OVERLAY) -> dict[str, Obj]:
    return {i["metadata"]["name"]: i for i in objects(overlay, "Issuer")}


def hours(duration: str) -> float:
    assert duration.endswith("h") and duration[:-1].isdigit(), duration
    return float(duration[:-1])


def flotilla_containers(docs: tuple[Obj, ...] | list[Obj]) -> list[tuple[Obj, Obj, Obj]]:
    """(workload, pod spec, container) of every Flotilla container."""
    return [(w, w["spec"]["template"]["spec"], c) for w in docs if w["kind"] in manifests.WORKLOADS
            for c in w["spec"]["template"]["spec"]["containers"] if c["image"].startswith(FLOTILLA_IMAGE)]


def mounted_secret(pod: Obj, container: Obj, path: str) -> Obj:
    """The Secret volume ``container`` mounts at ``path`` (read-only, the whole directory)."""
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert mount.get("readOnly") is True and "subPath" not in mount, mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "secret" in volume, f"{path} is not a Secret: {volume}"
    return volume["secret"]


def container_settings(overlay: str, container: Obj, monkeypatch: pytest.MonkeyPatch) -> FlotillaSettings:
    """The settings the container's process loads: the ConfigMap's file, then its literal environment.

    pydantic-settings drops an unknown nested variable silently: each FLOTILLA_* name is looked up in the
    schema first."""
    for env in container.get("env", []):
        if "value" in env and env["name"].startswith("FLOTILLA_"):
            assert_setting_exists(env["name"])
            monkeypatch.setenv(env["name"], env["value"])
    config_map = next(d for d in objects(overlay, "ConfigMap") if d["metadata"]["name"].startswith("flotilla-config"))
    return FlotillaSettings(**yaml.safe_load(config_map["data"]["flotilla.yaml"]))


def assert_setting_exists(name: str) -> None:
    model: Any = FlotillaSettings
    for part in name.removeprefix("FLOTILLA_").lower().split("__"):
        fields = model.model_fields
        assert part in fields, f"{name}: no such setting ({part} is not one of {sorted(fields)})"
        model = fields[part].annotation
    assert model is not None


def dns_matches(pattern: str, host: str) -> bool:
    """A certificate's DNS name (a leftmost ``*`` matches one label) against a host name."""
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return pattern == host


# --- the objects -------------------------------------------------------------------------------


def test_every_object_is_valid_and_in_the_namespace() -> None:
    for obj in rendered(OVERLAY):
        if obj["apiVersion"] == CRD_GROUP:
            manifests.check_prometheus_operator_object(obj)
        elif obj["apiVersion"] == CERT_MANAGER:
            check_cert_manager_object(obj)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"].get("namespace", "flotilla") == "flotilla", label(obj)
    # Namespaced Issuers only: the component creates nothing cluster-wide.
    assert not objects(OVERLAY, "ClusterIssuer")


def test_the_cert_manager_schema_catches_a_misspelt_field() -> None:
    certificate = next(iter(certificates().values()))
    broken = {**certificate, "spec": {**certificate["spec"], "dnsName": ["router"]}}
    with pytest.raises(jsonschema.ValidationError):
        check_cert_manager_object(broken)
    with pytest.raises(jsonschema.ValidationError):
        check_cert_manager_object({**certificate, "spec": {**certificate["spec"], "usages": ["server-auth"]}})


def test_a_self_signed_issuer_bootstraps_the_ca_that_issues_every_certificate() -> None:
    by_issuer = issuers()
    assert by_issuer[CA_ISSUER]["spec"] == {"ca": {"secretName": CA_ISSUER}}
    ca = certificates()[by_issuer[CA_ISSUER]["spec"]["ca"]["secretName"]]
    assert ca["spec"]["isCA"] is True and "cert sign" in ca["spec"]["usages"]
    bootstrap = by_issuer[ca["spec"]["issuerRef"]["name"]]
    assert ca["spec"]["issuerRef"]["kind"] == "Issuer" and bootstrap["spec"] == {"selfSigned": {}}
    # Renewed with its own key: what it signed before still verifies against the renewed CA.
    assert ca["spec"]["privateKey"]["rotationPolicy"] == "Never"
    assert hours(ca["spec"]["duration"]) >= 5 * 8760
    leaves = [c for c in certificates().values() if c is not ca]
    assert {c["spec"]["secretName"] for c in leaves} == {*TIER_SECRETS.values(), "flotilla-triton-tls",
                                                         "flotilla-minio-tls", "flotilla-admin-tls"}
    assert len(objects(OVERLAY, "Certificate")) == len(certificates()), "two Certificates write one Secret"
    for certificate in leaves:
        spec, where = certificate["spec"], label(certificate)
        assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer", "name": CA_ISSUER}, where
        assert not spec.get("isCA"), where
        assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}, where
        # Renewed well before it ends (a month: Triton's restart fits in it), and not a long-lived key.
        assert 24 * 7 <= hours(spec["renewBefore"]) < hours(spec["duration"]) <= 24 * 366, where
        assert "digital signature" in spec["usages"], where  # ECDSA signs the handshake
        assert certificate["metadata"]["name"] == spec["secretName"], where


def test_every_flotilla_container_mounts_its_certificate_where_tls_settings_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    by_secret = certificates()
    containers = flotilla_containers(rendered(OVERLAY))
    assert {w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] for w, _, _ in containers} \
        == set(TIER_SECRETS)
    for workload, pod, container in containers:
        where = label(workload)
        tier = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        secret = mounted_secret(pod, container, TLS_DIR)
        assert secret == {"secretName": TIER_SECRETS[tier]}, where  # every key: ca.crt, tls.crt, tls.key
        certificate = by_secret[secret["secretName"]]
        # Both ends of mutual TLS with one certificate: it serves, and it is presented as a client's.
        assert {"server auth", "client auth"} <= set(certificate["spec"]["usages"]), where
        # The name its callers check it against: routers and batchers dial pod IPs of batchers and
        # workers, which no certificate names, so every mesh dial checks tls.server_name, which
        # every mesh certificate but the router's carries (clients dial the router at its Service's names).
        assert f"{tier}.flotilla.svc" in certificate["spec"]["dnsNames"], where
        with monkeypatch.context() as env:
            config = container_settings(OVERLAY, container, env)
        tls = config.tls
        assert tls.enabled and tls.client_auth and tls.triton and tls.health_port == HEALTH_PORT, where
        files = {PurePosixPath(str(tls.ca_file)), PurePosixPath(str(tls.cert_file)), PurePosixPath(str(tls.key_file))}
        assert {p.parent for p in files} == {PurePosixPath(TLS_DIR)}, where
        assert {p.name for p in files} == SECRET_KEYS, where
        assert config.s3.secure and config.s3.ca_file in (None, tls.ca_file), where
        assert config.preprocess.triton_protocol == "grpc", where
        assert tls.server_name == "flotilla-mesh", where
        if tier != "router":  # the router is dialled by clients, at its Service's names
            assert tls.server_name in certificate["spec"]["dnsNames"], where
        names = [e["name"] for e in container["env"]]
        assert {n: e.get("value") for n, e in zip(names, container["env"], strict=True) if n in TLS_ENV} == TLS_ENV


def test_flotilla_probes_move_to_the_plaintext_health_port_with_their_services() -> None:
    plain = {(label(w), c["name"]): c for w, _, c in flotilla_containers(rendered(PLAIN))}
    for workload, _, container in flotilla_containers(rendered(OVERLAY)):
        before = plain[(label(workload), container["name"])]
        port = int(container["args"][container["args"].index("--port") + 1])
        for probe in PROBES:
            where = f"{label(workload)} {probe}"
            assert container[probe]["grpc"]["port"] == HEALTH_PORT, where
            assert before[probe]["grpc"]["port"] == port, where
            # The same check otherwise: the same health service name (or none), the same timing.
            assert {**container[probe], "grpc": {**container[probe]["grpc"], "port": port}} == before[probe], where


def test_the_plaintext_health_port_is_open_to_no_pod() -> None:
    # Only the kubelet probes it (the NetworkPolicies do not filter it); no pod needs it.
    for policy in objects(OVERLAY, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            assert HEALTH_PORT not in {p["port"] for p in rule.get("ports", [])}, policy["metadata"]["name"]
            assert rule.get("ports"), f"NetworkPolicy/{policy['metadata']['name']}: a rule open on every port"


def test_triton_serves_grpc_with_mutual_tls_on_files_its_mount_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    triton = named(OVERLAY, "StatefulSet", "triton")
    pod = triton["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if a.startswith("--grpc-") and "=" in a)
    assert args["grpc-use-ssl"] == "true" and args["grpc-use-ssl-mutual"] == "true"
    files = {flag: PurePosixPath(args[flag]) for flag in ("grpc-server-cert", "grpc-server-key", "grpc-root-cert")}
    (directory,) = {p.parent for p in files.values()}
    secret = mounted_secret(pod, container, str(directory))
    assert "items" not in secret  # every key of the Secret, under its own name
    assert {flag: p.name for flag, p in files.items()} == \
        {"grpc-server-cert": "tls.crt", "grpc-server-key": "tls.key", "grpc-root-cert": "ca.crt"}
    certificate = certificates()[secret["secretName"]]
    assert certificate["spec"]["issuerRef"]["name"] == CA_ISSUER and "server auth" in certificate["spec"]["usages"]
    # Every replica's gRPC name (the configuration's endpoints.triton) is one the certificate carries.
    config = manifests.settings(OVERLAY)
    for address in config.endpoints.triton:
        host = address.rsplit(":", 1)[0]
        assert any(dns_matches(name, host) for name in certificate["spec"]["dnsNames"]), host
    # The callers dial it over gRPC with TLS: the workers and the controller.
    for workload, _, flotilla in flotilla_containers(rendered(OVERLAY)):
        if flotilla["args"][1] in ("preprocess", "controller"):
            with monkeypatch.context() as env:
                settings = container_settings(OVERLAY, flotilla, env)
            assert settings.tls.triton and settings.preprocess.triton_protocol == "grpc", label(workload)
    # A renewal reaches tritonserver only through a restart: Reloader's annotation names the Secret.
    annotations = triton["metadata"].get("annotations", {})
    assert annotations.get("secret.reloader.stakater.com/reload") == secret["secretName"]
    # Workers reach only its TLS port: its plaintext HTTP endpoint is the kubelet's alone.
    policy = named(OVERLAY, "NetworkPolicy", "triton")
    workers = named(OVERLAY, "Deployment", "preprocess")["spec"]["template"]["metadata"]["labels"]
    for rule in policy["spec"]["ingress"]:
        if any(selects(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), workers) for peer in rule["from"]):
            assert {p["port"] for p in rule["ports"]} == {k8s.TRITON_GRPC_PORT}
    # The probes still read the HTTP endpoint's health (it has no TLS to fail on).
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}


def test_minio_finds_its_certificate_and_every_s3_client_trusts_it() -> None:
    minio = named(OVERLAY, "StatefulSet", "minio")
    pod = minio["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    certs_dir = args[args.index("--certs-dir") + 1]
    secret = mounted_secret(pod, container, certs_dir)
    # MinIO's names for cert-manager's keys; CAs/ holds the CAs it trusts.
    assert {item["key"]: item["path"] for item in secret["items"]} == \
        {"tls.crt": "public.crt", "tls.key": "private.key", "ca.crt": "CAs/ca.crt"}
    certificate = certificates()[secret["secretName"]]
    assert certificate["spec"]["issuerRef"]["name"] == CA_ISSUER and "server auth" in certificate["spec"]["usages"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS", probe
    # The host the services dial (s3.endpoint) and the one the bucket Job dials are the certificate's.
    config = manifests.settings(OVERLAY)
    assert config.s3.endpoint.rsplit(":", 1)[0] in certificate["spec"]["dnsNames"]
    job = named(OVERLAY, "Job", "minio-buckets")["spec"]["template"]["spec"]
    (mc,) = job["containers"]
    script = mc["args"][0]
    assert "https://minio:9000" in script and "http://" not in script
    assert "minio" in certificate["spec"]["dnsNames"]
    ca_dir = next(m["mountPath"] for m in mc["volumeMounts"] if m["name"] != "tmp")
    ca_secret = mounted_secret(job, mc, ca_dir)
    assert ca_secret["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # the CA's certificate, no key
    env = {e["name"]: e.get("value") for e in mc["env"]}
    assert ca_dir == f"{env['MC_CONFIG_DIR']}/certs/CAs" and env["SSL_CERT_FILE"] == f"{ca_dir}/ca.crt"


def test_the_admin_certificate_is_the_controllers_admin_identity_and_no_one_elses() -> None:
    config = manifests.settings(OVERLAY)
    admin = certificates()["flotilla-admin-tls"]["spec"]
    assert admin["commonName"] == "flotilla-admin"
    assert admin["commonName"] in config.controller.admin_identities
    assert "client auth" in admin["usages"] and "server auth" not in admin["usages"]
    assert not admin.get("dnsNames") and not admin.get("ipAddresses")
    mounted = {v["secret"]["secretName"] for _, pod in pod_specs(OVERLAY) for v in pod["volumes"] if "secret" in v}
    assert "flotilla-admin-tls" not in mounted, "no pod runs as the admin"
    for secret_name, certificate in certificates().items():
        if secret_name != "flotilla-admin-tls":
            assert certificate["spec"].get("commonName") not in config.controller.admin_identities, secret_name
    # No pod mounts the CA's key either.
    assert not any(v["secret"]["secretName"] == CA_ISSUER for _, pod in pod_specs(OVERLAY)
                   for v in pod["volumes"] if "secret" in v)


def test_metrics_stay_plaintext_and_are_still_scraped() -> None:
    monitors = objects(OVERLAY, "ServiceMonitor")
    assert monitors == objects(PLAIN, "ServiceMonitor")
    assert all("scheme" not in e and "tlsConfig" not in e for m in monitors for e in m["spec"]["endpoints"])
    manifests.test_service_monitors_scrape_every_service_and_triton(OVERLAY)


# --- the plain overlay, and what the component leaves alone -----------------------------------------

TOUCHED = {("StatefulSet", "triton"), ("StatefulSet", "minio"), ("Job", "minio-buckets"), ("NetworkPolicy", "triton")}
"""Besides every Flotilla Deployment: what the component patches."""


def test_the_plain_cpu_overlay_has_no_tls_and_the_component_changes_only_what_it_must() -> None:
    plain = {(d["kind"], d["metadata"]["name"]): d for d in rendered(PLAIN)}
    assert not [d for d in plain.values() if d["apiVersion"].startswith("cert-manager.io/")]
    for workload, pod, container in flotilla_containers(list(plain.values())):
        assert not {e["name"] for e in container.get("env", [])} & set(TLS_ENV), label(workload)
        assert TLS_DIR not in {m["mountPath"] for m in container["volumeMounts"]}, label(workload)
        assert not [v for v in pod["volumes"] if "secret" in v], label(workload)
    triton_args = plain[("StatefulSet", "triton")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not [a for a in triton_args if a.startswith("--grpc-use-ssl") or "cert" in a]
    assert "http://minio:9000" in plain[("Job", "minio-buckets")]["spec"]["template"]["spec"]["containers"][0]["args"][0]

    tls = {(d["kind"], d["metadata"]["name"]): d for d in rendered(OVERLAY)}
    added = {key for key, d in tls.items() if d["apiVersion"] == CERT_MANAGER}
    assert set(tls) - added == set(plain)
    flotilla = {(w["kind"], w["metadata"]["name"]) for w, _, _ in flotilla_containers(list(plain.values()))}
    for key, obj in plain.items():
        if key not in flotilla | TOUCHED:
            assert tls[key] == obj, f"{key[0]}/{key[1]}: the TLS component changed it"


# --- the component reaches every batcher and other overlays -----------------------------------------


def test_a_dedicated_batcher_gets_the_batchers_certificate(tmp_path: Path) -> None:
    docs = kustomize(rendered_with_dedicated_batcher(tmp_path) / "overlays" / OVERLAY)
    batchers = {w["metadata"]["name"]: (pod, c) for w, pod, c in flotilla_containers(docs) if "batcher" in c["args"]}
    assert set(batchers) == {k8s.batcher_name(), k8s.batcher_name("isolated")}
    for name, (pod, container) in batchers.items():
        assert mounted_secret(pod, container, TLS_DIR) == {"secretName": TIER_SECRETS["batcher"]}, name
        assert all(container[probe]["grpc"]["port"] == HEALTH_PORT for probe in PROBES), name
        assert {e["name"]: e.get("value") for e in container["env"] if e["name"] in TLS_ENV} == TLS_ENV, name


def test_the_component_turns_tls_on_in_the_gpu_overlay_too(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    shutil.copytree(K8S, out)
    overlay = out / "overlays" / "gpu-tls"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "flotilla",
        "resources": ["../gpu"],
        "components": ["../../components/tls"],
    }))
    docs = kustomize(overlay)
    containers = flotilla_containers(docs)
    assert len(containers) == len(flotilla_containers(rendered("gpu")))
    for workload, pod, container in containers:
        tier = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        assert mounted_secret(pod, container, TLS_DIR) == {"secretName": TIER_SECRETS[tier]}, label(workload)
        assert all(container[probe]["grpc"]["port"] == HEALTH_PORT for probe in PROBES), label(workload)
    (triton,) = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "triton"]
    container = triton["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("nvcr.io/") and "--grpc-use-ssl-mutual=true" in container["args"]
    assert len([d for d in docs if d["apiVersion"] == CERT_MANAGER]) == len(
        [d for d in rendered(OVERLAY) if d["apiVersion"] == CERT_MANAGER])


# --- tests/test_k8s_manifests.py's checks, on the TLS overlay -------------------------------------

UNCHANGED_CHECKS = [
    manifests.test_every_container_has_resources_a_hardened_context_and_a_pinned_image,
    manifests.test_triton_is_started_once_it_is_live_not_once_every_load_is_done,
    manifests.test_every_flotilla_container_runs_a_role_that_exists,
    manifests.test_the_configuration_loads_and_names_only_services_that_exist,
    manifests.test_no_secret_in_a_config_map_and_every_secret_reference_is_provided,
    manifests.test_disruption_budgets_cover_the_router_batchers_controller_and_triton,
    manifests.test_no_disruption_budget_blocks_a_node_drain,
    manifests.test_autoscalers_scale_on_the_documented_metrics,
    manifests.test_batcher_shards_advertise_their_pod_address_and_no_model_has_objects_of_its_own,
    manifests.test_network_policies_let_routers_reach_batchers_and_batchers_reach_the_controller,
    manifests.test_scaled_tiers_spread_over_zones_and_nodes_without_blocking_scheduling,
    manifests.test_triton_memory_limit_holds_its_budget_shared_memory_and_headroom,
    manifests.test_triton_accepts_the_workers_keepalive_pings,
]
"""What TLS does not change. The probes (moved to the health port), the validity of every object
(cert-manager's are checked here) and the policies (Triton's HTTP port closed) have variants above
and below."""


@pytest.mark.parametrize("check", UNCHANGED_CHECKS, ids=lambda check: check.__name__.removeprefix("test_"))
def test_the_tls_overlay_passes_the_overlays_checks(check: Any) -> None:
    check(OVERLAY)


def test_the_tls_overlay_takes_the_one_tracing_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    manifests.test_every_flotilla_container_takes_the_one_tracing_configuration(OVERLAY, monkeypatch)


def test_network_policies_leave_only_the_router_open_and_admit_every_tls_port() -> None:
    policies = objects(OVERLAY, "NetworkPolicy")
    assert [p for p in policies if p["metadata"]["name"] != "triton"] == \
        [p for p in objects(PLAIN, "NetworkPolicy") if p["metadata"]["name"] != "triton"]
    pods = {label(w): w["spec"]["template"]["metadata"]["labels"] for w, _ in pod_specs(OVERLAY)}
    for service in objects(OVERLAY, "Service"):
        backing = [w for w, labels in pods.items() if selects(service["spec"]["selector"], labels)]
        for port in service["spec"]["ports"]:
            if port["name"] == "metrics" or (service["metadata"]["name"], port["port"]) == ("triton", 8000):
                continue  # Triton's plaintext HTTP: the kubelet's probes only
            assert any(any(selects(p["spec"]["podSelector"].get("matchLabels", {}), pods[w]) for w in backing)
                       and any(port["port"] in {q["port"] for q in r.get("ports", [])} for r in p["spec"]["ingress"])
                       for p in policies if p["spec"].get("ingress")), \
                f"Service/{service['metadata']['name']} port {port['port']}: no policy lets anyone in"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if "from" not in rule:
                assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "router"}


# --- the guide -------------------------------------------------------------------------------------


def test_the_guide_says_how_to_turn_tls_on_rotate_and_use_the_admin_certificate() -> None:
    guide = (K8S / "README.md").read_text(encoding="utf-8")
    assert "\n## TLS\n" in guide
    section = guide[guide.index("\n## TLS\n"):].split("\n## ", 2)[1]
    for needle in ("components/tls", "kubectl apply -k k8s/overlays/cpu-tls", "cert-manager",
                   "flotilla-admin-tls", "FLOTILLA_TLS__CA_FILE", "FLOTILLA_TLS__CERT_FILE",
                   "FLOTILLA_TLS__KEY_FILE", "FLOTILLA_TLS__ENABLED", "rollout restart statefulset/triton",
                   "plaintext", str(HEALTH_PORT)):
        assert needle in section, f"k8s/README.md, TLS: no {needle!r}"
    # Every Secret the section tells operators to read is one the component's Certificates write.
    for secret in ("flotilla-admin-tls", "flotilla-router-tls"):
        assert secret in certificates()
    assert any(fnmatch.fnmatch(line, "*get secret flotilla-admin-tls*") for line in section.splitlines())
