"""flotilla.yaml deploys the built models with the specs the build checked them against, and a
stack started again in the same directory keeps the models it finds registered as configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flotilla.config import ModelSettings, deploy_json, load_settings
from flotilla.modelbuild.catalog import CATALOG
from flotilla.stack.local import spec_differs

REPO = Path(__file__).resolve().parents[2]


def test_the_stack_deploys_every_catalog_model_with_its_input_and_output() -> None:
    settings = load_settings(REPO / "flotilla.yaml")
    assert sorted(settings.models) == sorted(CATALOG)
    for name, spec in settings.models.items():
        built = ModelSettings.model_validate(CATALOG[name])
        assert spec.input == built.input, name
        assert (spec.output_name, spec.output_kind) == (built.output_name, built.output_kind), name
        assert spec.artifact == Path("build/models") / name


def registered(spec: ModelSettings, **filled: object) -> dict[str, object]:
    """The spec as the registry keeps it after a deploy: every setting, labels read from the
    artifact's labels.txt, and ``filled`` (dotted names) as a deploy read them from the graph."""
    data = json.loads(spec.model_dump_json())
    data["labels"] = ["cat", "dog"]
    for dotted, value in filled.items():
        *sections, key = dotted.split(".")
        target = data
        for section in sections:
            target = target[section]
        target[key] = value
    return data


def configured(name: str = "efficientnet-lite0", **changes: object) -> ModelSettings:
    """A model of flotilla.yaml as the stack deploys it (artifact uploaded, storage_uri set)."""
    spec = load_settings(REPO / "flotilla.yaml").models[name]
    return spec.model_copy(update={"artifact": None, "storage_uri": f"s3://flotilla-models/{name}", **changes})


def test_a_model_registered_by_an_earlier_start_is_not_replaced_for_what_its_deploy_filled_in() -> None:
    """Each `flotilla up` in one run directory finds its models registered with labels from the
    artifact; replacing them for that stopped and restarted every batcher ("model undeployed")."""
    for name in load_settings(REPO / "flotilla.yaml").models:
        spec = configured(name)
        assert not spec_differs(spec, registered(spec))


def test_settings_a_spec_leaves_to_the_graph_match_what_the_graph_said() -> None:
    spec = ModelSettings.model_validate({"storage_uri": "s3://flotilla-models/m", "memory_mb": 50})
    graph = {"input.name": "x", "input.dtype": "FP32", "input.layout": "NCHW", "input.height_px": 320,
             "input.width_px": 320, "output_name": "probs", "batching.max_batch_size": 1}
    assert not spec_differs(spec, registered(spec, **graph))


@pytest.mark.parametrize(
    ("spec", "filled"),
    [
        (configured(min_copies=0), {}),
        (configured(memory_mb=123.0), {}),
        (configured(labels=["a", "b"]), {}),
        (configured(input=configured().input.model_copy(update={"height_px": 256, "width_px": 256})), {}),
        # Left out of the configuration now, so the default, where it was set before:
        (ModelSettings.model_validate({"storage_uri": "s3://flotilla-models/m"}), {"min_copies": 2}),
        (ModelSettings.model_validate({"storage_uri": "s3://flotilla-models/m"}), {"input.channel_order": "BGR"}),
    ],
)
def test_a_configuration_that_changed_replaces_the_registered_model(
    spec: ModelSettings, filled: dict[str, object]
) -> None:
    before = configured() if not filled else spec
    assert spec_differs(spec, registered(before, **filled))


def test_a_deploy_sends_settings_changed_by_assignment_and_leaves_graph_settings_unset() -> None:
    # exclude_unset dropped a section changed by assignment (its parent never marks it set): the
    # fault stack's instance_groups = 2 reached Triton as 1.
    spec = ModelSettings()
    spec.backend.instance_groups = 2
    spec.batching.max_batch_size = 8
    sent = json.loads(deploy_json(spec))
    assert sent["backend"]["instance_groups"] == 2 and sent["batching"]["max_batch_size"] == 8
    assert "name" not in sent["input"] and "output_name" not in sent, "the controller reads them from the graph"
    given = ModelSettings.model_validate({"input": {"name": "x", "dtype": "FP32"}})
    sent = json.loads(deploy_json(given))
    assert sent["input"]["name"] == "x" and sent["input"]["dtype"] == "FP32" and "layout" not in sent["input"]
