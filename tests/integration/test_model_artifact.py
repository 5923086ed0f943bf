"""The built model repository holds a real ImageNet classifier Triton can load."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from flotilla.config import InputSpec
from flotilla.services.preprocess.imaging import decode_for_model, to_batch_tensor
from tests.integration.conftest import MODEL, MODEL_REPOSITORY, sample


def classify(photo: str) -> tuple[int, float]:
    spec = InputSpec()
    session = ort.InferenceSession(str(MODEL_REPOSITORY / MODEL / "1" / "model.onnx"))
    pixels = decode_for_model(sample(photo), spec, what=photo, max_pixels=10**9)
    probabilities = session.run(None, {"images": to_batch_tensor([pixels], spec)})[0][0]
    assert probabilities.shape == (1000,)
    assert abs(float(probabilities.sum()) - 1.0) < 1e-3  # softmax folded into the graph
    best = int(np.argmax(probabilities))
    return best, float(probabilities[best])


def test_chelsea_is_a_cat() -> None:
    index, score = classify("chelsea.jpg")
    assert index in range(281, 286) and score > 0.5


def test_coffee_is_espresso_or_cup() -> None:
    index, _ = classify("coffee.jpg")
    assert index in (967, 968)


def test_repository_layout_and_labels() -> None:
    model_dir = MODEL_REPOSITORY / MODEL
    config = (model_dir / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "TYPE_UINT8" in config
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[285] == "Egyptian cat" and labels[967] == "espresso"
    assert (model_dir / "1" / "model.py").exists()
