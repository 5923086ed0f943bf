"""The catalog's three models, run in-process on real photos with the worker's own preprocessing.

Every spec in ``flotilla.modelbuild.catalog`` must validate as a registry
record. With ``make models`` done, the real ONNX artifacts run with ONNX
Runtime on the sample JPEGs through ``decode_for_model``, ``to_batch_tensor``
and ``scores_to_probabilities``, and through the Triton Python-backend
wrapper with a stand-in for Triton's ``triton_python_backend_utils``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from flotilla.config import ModelSettings
from flotilla.modelbuild.catalog import CATALOG, DOCUMENT_ORIENTATION, EFFICIENTNET_LITE0, OPEN_NSFW
from flotilla.services.preprocess.imaging import decode_for_model, scores_to_probabilities, to_batch_tensor

BUILD = Path(__file__).resolve().parents[2] / "build"
MODELS = BUILD / "models"
SAMPLES = BUILD / "samples"
WRAPPER = Path(__file__).resolve().parents[2] / "flotilla" / "modelbuild" / "triton_onnx_model.py"
ALLOWED_KEYS = {"input", "output_name", "output_kind", "backend", "memory_mb"}


def test_every_catalog_entry_is_a_valid_registry_spec() -> None:
    assert set(CATALOG) == {EFFICIENTNET_LITE0, OPEN_NSFW, DOCUMENT_ORIENTATION}
    for name, entry in CATALOG.items():
        assert set(entry) <= ALLOWED_KEYS, name
        spec = ModelSettings(**entry)
        assert spec.backend.max_batch_size == 64
        assert spec.batching.max_batch_size <= spec.backend.max_batch_size


def test_the_catalog_states_each_models_own_preprocessing() -> None:
    nsfw = ModelSettings(**CATALOG[OPEN_NSFW]).input
    assert (nsfw.dtype, nsfw.layout, nsfw.channel_order, nsfw.resize, nsfw.resize_px) == (
        "FP32", "NHWC", "BGR", "stretch", 256
    )
    assert nsfw.mean == (104.0, 117.0, 123.0) and nsfw.scale == 1.0
    pages = ModelSettings(**CATALOG[DOCUMENT_ORIENTATION]).input
    assert (pages.dtype, pages.layout, pages.channel_order, pages.resize, pages.resize_px) == (
        "FP32", "NCHW", "BGR", "center_crop", 256
    )
    assert pages.scale == pytest.approx(1 / 255)


def model_path(name: str) -> Path:
    path = MODELS / name / "1" / "model.onnx"
    if not path.is_file() or not (MODELS / name / "labels.txt").is_file():
        pytest.skip(f"{path} is not built; run `make models`")
    return path


def sample(relative: str) -> bytes:
    path = SAMPLES / relative
    if not path.is_file():
        pytest.skip(f"{path} is not built; run `make models`")
    return path.read_bytes()


def labels(name: str) -> list[str]:
    model_path(name)  # skips when not built
    return (MODELS / name / "labels.txt").read_text(encoding="utf-8").splitlines()


@functools.cache
def session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_path(name)), providers=["CPUExecutionProvider"])


def classify(name: str, photos: list[str]) -> np.ndarray:
    """Probabilities per photo: worker preprocessing, the real ONNX file, the catalog's output kind."""
    model_path(name)  # skips when not built
    spec = ModelSettings(**CATALOG[name])
    pixels = [decode_for_model(sample(p), spec.input, what=p, max_pixels=10**9) for p in photos]
    scores = session(name).run([spec.output_name], {spec.input.name: to_batch_tensor(pixels, spec.input)})[0]
    probabilities = scores_to_probabilities(scores, spec.output_kind)
    assert probabilities.shape == (len(photos), len(labels(name)))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    return probabilities


def test_efficientnet_sees_the_cat_and_the_espresso() -> None:
    names = labels(EFFICIENTNET_LITE0)
    chelsea, coffee = classify(EFFICIENTNET_LITE0, ["chelsea.jpg", "coffee.jpg"])
    assert names[int(np.argmax(chelsea))] == "Egyptian cat" and chelsea.max() > 0.6
    assert names[int(np.argmax(coffee))] == "espresso" and coffee.max() > 0.6


def test_open_nsfw_finds_the_photos_safe() -> None:
    assert labels(OPEN_NSFW) == ["sfw", "nsfw"]
    photos = ["chelsea.jpg", "coffee.jpg"]
    for photo, (sfw, nsfw) in zip(photos, classify(OPEN_NSFW, photos), strict=True):
        assert sfw > 0.95, (photo, sfw, nsfw)


@pytest.mark.parametrize("clockwise_deg", [0, 90, 180, 270])
def test_document_orientation_names_each_rotation(clockwise_deg: int) -> None:
    name = "page-upright.jpg" if clockwise_deg == 0 else f"page-rot{clockwise_deg}.jpg"
    [probabilities] = classify(DOCUMENT_ORIENTATION, [f"documents/{name}"])
    names = labels(DOCUMENT_ORIENTATION)
    assert names == ["0", "90", "180", "270"]
    # The model's class is the clockwise turn the page has taken.
    assert names[int(np.argmax(probabilities))] == str(clockwise_deg)
    assert probabilities.max() > 0.8


# --- the Triton Python-backend wrapper ------------------------------------------------


def fake_pb_utils() -> types.ModuleType:
    """Just enough of triton_python_backend_utils for TritonPythonModel."""
    module = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors: list[Tensor], error: object = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    class TritonError:
        def __init__(self, message: str) -> None:
            self.message = message

    module.Tensor = Tensor  # type: ignore[attr-defined]
    module.InferenceResponse = InferenceResponse  # type: ignore[attr-defined]
    module.TritonError = TritonError  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: request[name]  # type: ignore[attr-defined]
    return module


def wrapped_model(name: str, monkeypatch: pytest.MonkeyPatch, repository: Path) -> tuple[object, types.ModuleType]:
    """TritonPythonModel initialised on the artifact, as Triton would with the controller's config."""
    path = model_path(name)
    spec = ModelSettings(**CATALOG[name])
    pb_utils = fake_pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    loader = importlib.util.spec_from_file_location("flotilla_test_triton_onnx_model", WRAPPER)
    assert loader is not None and loader.loader is not None
    wrapper = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(wrapper)

    (repository / "1").mkdir()
    (repository / "1" / "model.onnx").symlink_to(path)
    config = {  # the parts of the controller's model config that the wrapper reads
        "input": [{"name": spec.input.name}],
        "output": [{"name": spec.output_name}],
        "parameters": {"onnx_file": {"string_value": "model.onnx"}, "intra_op_threads": {"string_value": "1"}},
    }
    model = wrapper.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repository), "model_version": "1"})
    return model, pb_utils


@pytest.mark.parametrize("name", [EFFICIENTNET_LITE0, OPEN_NSFW, DOCUMENT_ORIENTATION])
def test_the_triton_wrapper_runs_each_artifact(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = ModelSettings(**CATALOG[name])
    model, pb_utils = wrapped_model(name, monkeypatch, tmp_path)

    photos = ["chelsea.jpg", "coffee.jpg", "documents/page-rot90.jpg"]
    pixels = [decode_for_model(sample(p), spec.input, what=p, max_pixels=10**9) for p in photos]
    first, second = to_batch_tensor(pixels[:1], spec.input), to_batch_tensor(pixels[1:], spec.input)
    requests = [{spec.input.name: pb_utils.Tensor(spec.input.name, t)} for t in (first, second)]  # type: ignore[attr-defined]
    responses = model.execute(requests)  # type: ignore[attr-defined]

    assert [r.error for r in responses] == [None, None]
    [[out1], [out2]] = [r.output_tensors for r in responses]
    assert out1.name == out2.name == spec.output_name
    assert out1.array.shape == (1, len(labels(name))) and out2.array.shape == (2, len(labels(name)))
    batch = np.concatenate([first, second])
    direct = model.session.run([spec.output_name], {spec.input.name: batch})[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(np.concatenate([out1.array, out2.array]), direct, rtol=1e-5, atol=1e-6)


def test_the_triton_wrapper_answers_a_wrong_input_with_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model, pb_utils = wrapped_model(DOCUMENT_ORIENTATION, monkeypatch, tmp_path)
    uint8_nhwc = np.zeros((1, 224, 224, 3), dtype=np.uint8)  # the wrong dtype and layout for "x"
    responses = model.execute([{"x": pb_utils.Tensor("x", uint8_nhwc)}])  # type: ignore[attr-defined]
    assert len(responses) == 1 and responses[0].output_tensors == []
    assert responses[0].error.message.startswith(("InvalidArgument", "Fail", "RuntimeException"))
