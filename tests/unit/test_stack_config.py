"""flotilla.yaml deploys the built models with the specs the build checked them against."""

from __future__ import annotations

from pathlib import Path

from flotilla.config import ModelSettings, load_settings
from flotilla.modelbuild.catalog import CATALOG

REPO = Path(__file__).resolve().parents[2]


def test_the_stack_deploys_every_catalog_model_with_its_input_and_output() -> None:
    settings = load_settings(REPO / "flotilla.yaml")
    assert sorted(settings.models) == sorted(CATALOG)
    for name, spec in settings.models.items():
        built = ModelSettings.model_validate(CATALOG[name])
        assert spec.input == built.input, name
        assert (spec.output_name, spec.output_kind) == (built.output_name, built.output_kind), name
        assert spec.artifact == Path("build/models") / name
