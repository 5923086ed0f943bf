"""`flotilla k8s render`: the committed generated manifests are fresh, adding a model is one entry, another
file's models join the cluster's configuration (nothing else of that file), and Triton's memory follows the budget."""

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


def test_adding_a_model_is_one_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_tree(tmp_path)
    source = out / k8s.SOURCE
    data = yaml.safe_load(source.read_text())
    data["models"]["open-nsfw"] = {"storage_uri": "s3://flotilla-models/open-nsfw", "memory_mb": 300}
    source.write_text(yaml.safe_dump(data))

    main(["k8s", "render", "--out", str(out), "--observability", str(OBSERVABILITY)])

    docs = list(yaml.safe_load_all((out / k8s.OUTPUTS["batchers"]).read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs if d["metadata"]["name"] == "batcher-open-nsfw"}
    assert kinds == {(kind, "batcher-open-nsfw") for kind in
                     ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler")}
    config = yaml.safe_load((out / k8s.OUTPUTS["config"]).read_text())
    assert config["endpoints"]["batchers"]["open-nsfw"] == ["batcher-open-nsfw.flotilla.svc:50052"]
    assert config["models"] == data["models"]

    main(["k8s", "render", "--check", "--out", str(out), "--observability", str(OBSERVABILITY)])
    assert "up to date" in capsys.readouterr().out


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
                      "models:\n  a: {artifact: build/models/a}\n  b: {storage_uri: 's3://elsewhere/b'}\n")
    rendered = k8s.render(K8S, OBSERVABILITY, models=models, scaling=k8s.BatcherScaling(max_replicas=5))
    hpas = [d for d in yaml.safe_load_all(rendered[k8s.OUTPUTS["batchers"]]) if d["kind"] == "HorizontalPodAutoscaler"]
    assert [(h["metadata"]["name"], h["spec"]["maxReplicas"]) for h in hpas] == [("batcher-a", 5), ("batcher-b", 5)]
    config = yaml.safe_load(rendered[k8s.OUTPUTS["config"]])
    # Only the models: are the file's; the Triton StatefulSet has the base's replicas, so do the endpoints.
    assert len(config["endpoints"]["triton"]) == 2 and config["triton"] == {"replicas": 2}
    assert (config["host"], config["s3"]["endpoint"]) == ("0.0.0.0", "minio.flotilla.svc:9000")
    # A local artifact directory means nothing in the cluster: the model is where `models upload` puts it.
    assert config["models"] == {"a": {"storage_uri": "s3://flotilla-models/a"}, "b": {"storage_uri": "s3://elsewhere/b"}}


@pytest.mark.parametrize("generated", [k8s.OUTPUTS["config"], CPU_CONFIG])
def test_the_local_stack_file_gives_its_models_not_its_addresses(generated: Path) -> None:
    """`--models flotilla.yaml` (host 127.0.0.1, SeaweedFS on loopback) must not make every pod bind loopback."""
    rendered = k8s.render(K8S, OBSERVABILITY, models=LOCAL_CONFIG)
    cluster = yaml.safe_load((K8S / generated).read_text())
    config = yaml.safe_load(rendered[generated])
    assert config["host"] == "0.0.0.0" and config["s3"]["endpoint"] == "minio.flotilla.svc:9000"
    mine = ("models", "endpoints")  # the endpoints name the file's batchers
    assert {k: v for k, v in config.items() if k not in mine} == {k: v for k, v in cluster.items() if k not in mine}
    local = yaml.safe_load(LOCAL_CONFIG.read_text())["models"]
    assert list(config["models"]) == list(local)
    for name, spec in config["models"].items():
        assert "artifact" not in spec and spec["storage_uri"] == f"s3://flotilla-models/{name}"
        assert spec["input"] == local[name]["input"] and spec["batching"] == local[name]["batching"]
    assert set(config["endpoints"]["batchers"]) == set(local)
    FlotillaSettings(**config)
    batchers = {d["metadata"]["name"] for d in yaml.safe_load_all(rendered[k8s.OUTPUTS["batchers"]])}
    assert batchers == {k8s.batcher_name(m) for m in local}
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
