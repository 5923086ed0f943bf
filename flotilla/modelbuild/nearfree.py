"""A near-free model with EfficientNet-Lite0's signature, for the mesh-overhead bench.

Runs in the build virtualenv (it needs the ``onnx`` package)::

    python -m flotilla.modelbuild.nearfree --out build/models/near-free

writes ``<out>/1/model.onnx`` and ``<out>/labels.txt``. The graph takes
``images: UINT8 [-1, 224, 224, 3]`` and answers ``probabilities: FP32
[-1, 1000]``: it flattens each image, keeps its first 1000 bytes, casts them
to float and softmaxes them. A few microseconds per image, so what the bench
measures through it is the mesh, not the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
CLASSES = 1000
HEIGHT_PX = WIDTH_PX = 224
CHANNELS = 3
ONNX_OPSET = 17
VERSION = 1


def build_graph() -> onnx.ModelProto:
    """The ONNX model: Reshape -> Slice -> Cast -> Softmax."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    constants = [
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "starts"),
        numpy_helper.from_array(np.array([CLASSES], dtype=np.int64), "ends"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Reshape", [INPUT_NAME, "flat_shape"], ["flat"]),
        helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["head"]),
        helper.make_node("Cast", ["head"], ["logits"], to=TensorProto.FLOAT),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "near-free",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [None, HEIGHT_PX, WIDTH_PX, CHANNELS])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, CLASSES])],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = 8  # readable by the ONNX Runtime in the Triton image as well as the newest
    return model


def write(out: Path) -> Path:
    """Write ``out/{labels.txt,1/model.onnx}``; model.onnx last, by a rename."""
    import onnx

    model = build_graph()
    onnx.checker.check_model(model)
    version_dir = out / str(VERSION)
    version_dir.mkdir(parents=True, exist_ok=True)
    (out / "labels.txt").write_text("".join(f"class-{i}\n" for i in range(CLASSES)), encoding="utf-8")
    target = version_dir / "model.onnx"
    tmp = target.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/models/near-free"))
    print(write(parser.parse_args().out))


if __name__ == "__main__":
    main()
