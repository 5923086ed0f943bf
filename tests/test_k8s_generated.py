"""`flotilla k8s render`: the committed generated manifests are fresh, and adding a model is one entry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from flotilla import k8s
from flotilla.cli import main

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OBSERVABILITY = REPO / "observability"


def test_the_committed_generated_files_are_up_to_date() -> None:
    rendered = k8s.render(K8S, OBSERVABILITY)
    assert set(rendered) == set(k8s.OUTPUTS.values())
    assert k8s.stale(K8S, rendered) == [], "stale generated manifests: run `flotilla k8s render`"


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
    models.write_text("models:\n  a: {}\n  b: {}\ntriton: {replicas: 3}\n")
    rendered = k8s.render(K8S, OBSERVABILITY, models=models, scaling=k8s.BatcherScaling(max_replicas=5))
    hpas = [d for d in yaml.safe_load_all(rendered[k8s.OUTPUTS["batchers"]]) if d["kind"] == "HorizontalPodAutoscaler"]
    assert [(h["metadata"]["name"], h["spec"]["maxReplicas"]) for h in hpas] == [("batcher-a", 5), ("batcher-b", 5)]
    endpoints = yaml.safe_load(rendered[k8s.OUTPUTS["config"]])["endpoints"]
    assert len(endpoints["triton"]) == 3


def test_the_rules_and_dashboard_are_the_observability_files_unchanged() -> None:
    rendered = k8s.render(K8S, OBSERVABILITY)
    (rule,) = yaml.safe_load_all(rendered[k8s.OUTPUTS["rules"]])
    assert rule["spec"]["groups"] == yaml.safe_load((OBSERVABILITY / k8s.ALERTS).read_text())["groups"]
    (dashboard,) = yaml.safe_load_all(rendered[k8s.OUTPUTS["dashboard"]])
    assert dashboard["data"]["flotilla.json"] == (OBSERVABILITY / k8s.DASHBOARD).read_text()
