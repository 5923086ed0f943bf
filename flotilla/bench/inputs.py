"""What the bench's parts measure on: its stacks' configuration, its model and its photos.

Paths are relative to the repository root, where ``flotilla bench`` runs; ``make models``
builds the model and the photos.
"""

from __future__ import annotations

from pathlib import Path

from flotilla.modelbuild.catalog import EFFICIENTNET_LITE0

MODEL = EFFICIENTNET_LITE0
BENCH_CONFIG = Path("bench/flotilla-bench.yaml")
"""The configuration of the stacks the bench starts (each part adjusts replicas and models)."""
SAMPLES = Path("build/samples")
LARGE_PHOTOS = "build/samples/large/*.jpg (1-2 MP)"
"""The large photos, as the results name them."""


def large_photos() -> list[bytes]:
    """The bench's 1-2 MP photos (``LARGE_PHOTOS``)."""
    return [p.read_bytes() for p in sorted((SAMPLES / "large").glob("*.jpg"))]


def small_photos() -> list[bytes]:
    """The five small sample photos (``build/samples/*.jpg``)."""
    return [p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg"))]


# -- the batching part's load points (flotilla.bench.run) ----------------------------

SATURATION_BATCH_SIZES = (8, 16)
"""The ``max_batch_size`` values the mesh is saturated at."""
BELOW_SATURATION_LOAD = 0.25
ARRIVAL_LIMITED_LOAD = 0.7
"""Open-loop rates as a fraction of the mesh's saturated throughput."""
