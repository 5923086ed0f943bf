"""`flotilla k8s render`: the committed generated manifests are fresh, a model has objects of its own only
when its spec asks for a dedicated batcher, another file's models join the cluster's configuration (nothing
else of that file), and Triton's memory follows the budget."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flotilla import k8s
from flotilla.cli import main
from flotilla.config import FlotillaSettings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OBSERVABILITY = REPO / "observability"
LOCAL_CONFIG = REPO / "flotilla.yaml"
CPU_CONFIG = k8s.overlay_outputs("cpu")["config"]
CPU_MEMORY = k8s.overlay_outputs("cpu")["triton_memory"]


def test_the_committed_generated_files_are_up_to_date() -> None:
    rendered = k8s.render(K8S, OBSERVABILITY)
    assert set(rendered) == set(k8s.OUTPUTS.values()) | {CPU_CONFIG, CPU_MEMORY}
    assert k8s.stale(K8S, rendered) == [], "stale generated manifests: run `flotilla k8s render`"


def test_the_render_ignores_the_flotilla_variables_of_whoever_runs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The local stack's FLOTILLA_* overrides in a developer's shell must not reach the manifests.
    monkeypatch.setenv("FLOTILLA_TRITON__REPLICAS", "5")
    monkeypatch.setenv("FLOTILLA_HOST", "127.0.0.1")
    assert k8s.stale(K8S, k8s.render(K8S, OBSERVABILITY)) == []


def copy_tree(tmp_path: Path) -> Path:
    out = tmp_path / "k8s"
    shutil.copytree(K8S, out)
    return out


def batcher_objects(text: str) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(text)}


SHARD_OBJECTS = {("Deployment", "batcher"), ("PodDisruptionBudget", "batcher"), ("HorizontalPodAutoscaler", "batcher"),
                 ("Service", "batcher")}
"""The batching tier whatever the models: the shards, and the headless Service Prometheus scrapes batchers through."""
DEDICATED_KINDS = ("Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler")


def test_a_model_has_no_objects_of_its_own_unless_it_asks_for_a_dedicated_batcher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_tree(tmp_path)
    source = out / k8s.SOURCE
    data = yaml.safe_load(source.read_text())
    data["models"]["open-nsfw"] = {"storage_uri": "s3://flotilla-models/open-nsfw", "memory_mb": 300}
    data["models"]["isolated"] = {"storage_uri": "s3://flotilla-models/isolated", "dedicated_batcher": True}
    source.write_text(yaml.safe_dump(data))

    main(["k8s", "render", "--out", str(out), "--observability", str(OBSERVABILITY)])

    text = (out / k8s.OUTPUTS["batchers"]).read_text()
    assert batcher_objects(text) == SHARD_OBJECTS | {(kind, "batcher-isolated") for kind in DEDICATED_KINDS}
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text)}
    (container,) = docs[("Deployment", "batcher-isolated")]["spec"]["template"]["spec"]["containers"]
    assert container["args"][:4] == ["serve", "batcher", "--model", "isolated"]
    (container,) = docs[("Deployment", "batcher")]["spec"]["template"]["spec"]["containers"]
    assert "--model" not in container["args"]
    config = yaml.safe_load((out / k8s.OUTPUTS["config"]).read_text())
    assert "batchers" not in config["endpoints"]  # routers learn the shards from the controller's fleet
    assert config["models"] == data["models"]
    FlotillaSettings(**config)

    main(["k8s", "render", "--check", "--out", str(out), "--observability", str(OBSERVABILITY)])
    assert "up to date" in capsys.readouterr().out


def test_the_committed_batchers_are_the_shards_and_the_dedicated_ones() -> None:
    settings = k8s.load_source((K8S / k8s.SOURCE).read_text(), "base")
    dedicated = {(kind, k8s.batcher_name(m)) for m in k8s.dedicated_models(settings) for kind in DEDICATED_KINDS}
    assert batcher_objects((K8S / k8s.OUTPUTS["batchers"]).read_text()) == SHARD_OBJECTS | dedicated


def test_the_shard_bounds_come_from_the_flags(tmp_path: Path) -> None:
    out = copy_tree(tmp_path)
    main(["k8s", "render", "--out", str(out), "--observability", str(OBSERVABILITY),
          "--batcher-min-replicas", "3", "--batcher-max-replicas", "12"])
    hpa = next(d for d in yaml.safe_load_all((out / k8s.OUTPUTS["batchers"]).read_text())
               if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == "batcher")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    with pytest.raises(SystemExit, match="batcher-min-replicas"):
        main(["k8s", "render", "--out", str(out), "--observability", str(OBSERVABILITY), "--batcher-min-replicas", "9"])


def test_check_fails_on_a_stale_file_and_render_rejects_handwritten_endpoints(tmp_path: Path) -> None:
    out = copy_tree(tmp_path)
    (out / k8s.OUTPUTS["batchers"]).write_text("# edited by hand\n")
    with pytest.raises(SystemExit, match="stale.*batchers.generated.yaml"):
        main(["k8s", "render", "--check", "--out", str(out), "--observability", str(OBSERVABILITY)])

    source = out / k8s.SOURCE
    source.write_text(source.read_text() + "endpoints: {router: 'x:1'}\n")
    with pytest.raises(SystemExit, match="remove `endpoints:`"):
        main(["k8s", "render", "--out", str(out), "--observability", str(OBSERVABILITY)])


def test_a_model_list_from_another_file(tmp_path: Path) -> None:
    models = tmp_path / "fleet.yaml"
    models.write_text("host: 127.0.0.1\ns3: {endpoint: '127.0.0.1:8333'}\ntriton: {replicas: 3}\n"
                      "models:\n  a: {artifact: build/models/a}\n  b: {storage_uri: 's3://elsewhere/b'}\n"
                      "  c: {dedicated_batcher: true}\n")
    rendered = k8s.render(K8S, OBSERVABILITY, models=models, scaling=k8s.BatcherScaling(max_replicas=5))
    hpas = [d for d in yaml.safe_load_all(rendered[k8s.OUTPUTS["batchers"]]) if d["kind"] == "HorizontalPodAutoscaler"]
    assert [(h["metadata"]["name"], h["spec"]["maxReplicas"]) for h in hpas] == \
        [("batcher", 5), ("batcher-c", k8s.BatcherScaling().dedicated_max_replicas)]
    config = yaml.safe_load(rendered[k8s.OUTPUTS["config"]])
    # Only the models: are the file's; the Triton StatefulSet has the base's replicas, so do the endpoints.
    assert len(config["endpoints"]["triton"]) == 2 and config["triton"] == {"replicas": 2}
    assert (config["host"], config["s3"]["endpoint"]) == ("0.0.0.0", "minio.flotilla.svc:9000")
    # A local artifact directory means nothing in the cluster: the model is where `models upload` puts it.
    assert config["models"] == {"a": {"storage_uri": "s3://flotilla-models/a"}, "b": {"storage_uri": "s3://elsewhere/b"},
                                "c": {"dedicated_batcher": True, "storage_uri": "s3://flotilla-models/c"}}


def test_render_models_through_the_command_keeps_the_clusters_configuration(tmp_path: Path) -> None:
    """`flotilla k8s render --models flotilla.yaml` as an operator runs it: the ConfigMaps it writes (the base's
    and the overlay's) keep the cluster's host, S3 endpoint and everything else; only models: changes."""
    out = copy_tree(tmp_path)
    before = {rel: yaml.safe_load((out / rel).read_text()) for rel in (k8s.OUTPUTS["config"], CPU_CONFIG)}
    main(["k8s", "render", "--models", str(LOCAL_CONFIG), "--out", str(out), "--observability", str(OBSERVABILITY)])
    local = yaml.safe_load(LOCAL_CONFIG.read_text())
    assert local["host"] == "127.0.0.1"  # the local stack binds loopback: what must not reach the pods
    for rel, cluster in before.items():
        config = yaml.safe_load((out / rel).read_text())
        assert (config["host"], config["s3"]["endpoint"]) == ("0.0.0.0", "minio.flotilla.svc:9000"), rel
        assert {k: v for k, v in config.items() if k != "models"} == {k: v for k, v in cluster.items() if k != "models"}
        assert list(config["models"]) == list(local["models"]), rel


@pytest.mark.parametrize("generated", [k8s.OUTPUTS["config"], CPU_CONFIG])
def test_the_local_stack_file_gives_its_models_not_its_addresses(generated: Path) -> None:
    """`--models flotilla.yaml` (host 127.0.0.1, SeaweedFS on loopback) must not make every pod bind loopback."""
    rendered = k8s.render(K8S, OBSERVABILITY, models=LOCAL_CONFIG)
    cluster = yaml.safe_load((K8S / generated).read_text())
    config = yaml.safe_load(rendered[generated])
    assert config["host"] == "0.0.0.0" and config["s3"]["endpoint"] == "minio.flotilla.svc:9000"
    assert {k: v for k, v in config.items() if k != "models"} == {k: v for k, v in cluster.items() if k != "models"}
    local = yaml.safe_load(LOCAL_CONFIG.read_text())["models"]
    assert list(config["models"]) == list(local)
    for name, spec in config["models"].items():
        assert "artifact" not in spec and spec["storage_uri"] == f"s3://flotilla-models/{name}"
        assert spec["input"] == local[name]["input"] and spec["batching"] == local[name]["batching"]
    FlotillaSettings(**config)
    dedicated = {k8s.batcher_name(m) for m, spec in local.items() if spec.get("dedicated_batcher")}
    batchers = {d["metadata"]["name"] for d in yaml.safe_load_all(rendered[k8s.OUTPUTS["batchers"]])}
    assert batchers == {k8s.batcher_name()} | dedicated
    if generated == k8s.OUTPUTS["config"]:  # the base's text is kept, comments included
        assert "Secrets are not here" in rendered[generated]


def test_the_triton_memory_limit_follows_the_budget(tmp_path: Path) -> None:
    out = copy_tree(tmp_path)
    (out / "overlays/cpu/flotilla.yaml").write_text("controller: {replica_memory_mb: [3000, 2500]}\n")
    source = out / k8s.SOURCE
    data = yaml.safe_load(source.read_text())
    data["controller"]["replica_memory_mb"] = [7000.5]
    source.write_text(yaml.safe_dump(data))

    main(["k8s", "render", "--out", str(out), "--observability", str(OBSERVABILITY)])

    memory = k8s.TritonMemory()
    for generated, budget_mb in [(k8s.OUTPUTS["triton_memory"], 7001), (CPU_MEMORY, 3000)]:
        patch = yaml.safe_load((out / generated).read_text())
        pod = patch["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["memory"] == \
            f"{budget_mb + memory.shm_mb + memory.headroom_mb}Mi", generated
        assert pod["volumes"] == [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{memory.shm_mb}Mi"}}]
    cpu = yaml.safe_load((out / CPU_CONFIG).read_text())
    assert cpu["controller"]["replica_memory_mb"] == [3000, 2500] and cpu["host"] == "0.0.0.0"


def test_an_overlay_cannot_change_the_models(tmp_path: Path) -> None:
    out = copy_tree(tmp_path)
    (out / "overlays/cpu/flotilla.yaml").write_text("models: {other: {}}\n")
    with pytest.raises(SystemExit, match="overlays/cpu/flotilla.yaml: remove `models:`"):
        main(["k8s", "render", "--out", str(out), "--observability", str(OBSERVABILITY)])


def test_the_rules_and_dashboard_are_the_observability_files_unchanged() -> None:
    rendered = k8s.render(K8S, OBSERVABILITY)
    (rule,) = yaml.safe_load_all(rendered[k8s.OUTPUTS["rules"]])
    assert rule["spec"]["groups"] == yaml.safe_load((OBSERVABILITY / k8s.ALERTS).read_text())["groups"]
    (dashboard,) = yaml.safe_load_all(rendered[k8s.OUTPUTS["dashboard"]])
    assert dashboard["data"]["flotilla.json"] == (OBSERVABILITY / k8s.DASHBOARD).read_text()
