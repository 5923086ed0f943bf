"""Reading a model.onnx graph and fitting a spec to it (services/controller/graph.py), on small ONNX
models built here with onnx's helper API, and ArtifactStore.graph over an in-memory object store."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from flotilla.config import ModelSettings
from flotilla.errors import ArtifactUnavailable, Code, ImageNotFound
from flotilla.services.controller.artifacts import ArtifactStore
from flotilla.services.controller.graph import ModelGraph, SpecMismatch, fit_spec, read_graph

URI = "s3://flotilla-models/m"
Shape = list[int | str]


def classifier(
    input_shape: Shape = ("N", 3, 320, 320),  # type: ignore[assignment]
    *,
    input_name: str = "x",
    input_type: int = TensorProto.FLOAT,
    output_name: str = "probs",
    output_shape: Shape = ("N", 10),  # type: ignore[assignment]
    output_type: int = TensorProto.FLOAT,
    extra_inputs: int = 0,
    weight_as_input: bool = False,
) -> bytes:
    """A serialized graph with the given input and output declarations (its body is never run here)."""
    inputs = [helper.make_tensor_value_info(input_name, input_type, list(input_shape))]
    inputs += [helper.make_tensor_value_info(f"extra{i}", TensorProto.FLOAT, [1]) for i in range(extra_inputs)]
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])
    if weight_as_input:  # old exporters (IR < 4) list initializers among the inputs too
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1]))
    nodes = [
        helper.make_node("Cast", [input_name], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "w"], ["scaled"]),
        helper.make_node("Flatten", ["scaled"], ["flat"]),
        helper.make_node("Cast", ["flat"], [output_name], to=output_type),
    ]
    graph = helper.make_graph(
        nodes, "classifier", inputs, [helper.make_tensor_value_info(output_name, output_type, list(output_shape))],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def graph_of(data: bytes) -> ModelGraph:
    return read_graph(data, f"{URI}/1/model.onnx")


def fit(spec: dict[str, object], *graphs: bytes) -> tuple[ModelSettings, tuple[str, ...], str]:
    settings = ModelSettings.model_validate({"storage_uri": URI, **spec})
    fitted, result = fit_spec(settings, {i + 1: graph_of(g) for i, g in enumerate(graphs)}, URI)
    return fitted, result.inferred, result.message


def test_the_graph_declares_its_inputs_and_outputs_without_initializers() -> None:
    graph = graph_of(classifier(weight_as_input=True))
    assert graph.describe() == "input 'x' FP32 [N,3,320,320]; output 'probs' FP32 [N,10]"
    assert [i.name for i in graph.inputs] == ["x"], "an initializer listed as an input is a weight, not an input"


@pytest.mark.parametrize("data", [b"this is not an ONNX graph", b""])
def test_a_file_that_is_no_onnx_model_is_unavailable_saying_so(data: bytes) -> None:
    with pytest.raises(ArtifactUnavailable) as caught:
        graph_of(data)
    assert caught.value.code == Code.FAILED_PRECONDITION
    assert f"{URI}/1/model.onnx is not a readable ONNX model" in caught.value.message
    assert "flotilla models upload" in caught.value.message


def test_a_spec_without_input_settings_takes_them_from_the_graph() -> None:
    spec, inferred, message = fit({"input": {"mean": [0.5, 0.5, 0.5], "scale": 1 / 255}}, classifier())

    assert (spec.input.name, spec.input.dtype, spec.input.layout) == ("x", "FP32", "NCHW")
    assert (spec.input.height_px, spec.input.width_px, spec.output_name) == (320, 320, "probs")
    assert spec.input.mean == (0.5, 0.5, 0.5) and spec.input.channel_order == "RGB", "only the spec says these"
    assert inferred == ("input.name", "input.dtype", "input.layout", "input.height_px", "input.width_px", "output_name")
    assert "read from the graph: input.name" in message and "input 'x' FP32 NCHW 320x320" in message


def test_settings_the_spec_gives_are_kept_and_only_the_rest_read() -> None:
    data = classifier(("N", 224, 224, 3), input_name="images", input_type=TensorProto.UINT8)
    spec, inferred, _ = fit({"input": {"name": "images", "dtype": "UINT8"}, "output_name": "probs"}, data)
    assert (spec.input.layout, spec.input.height_px) == ("NHWC", 224)
    assert inferred == ("input.layout", "input.height_px", "input.width_px")


def test_a_mismatching_spec_names_both_sides_and_the_spec_that_fits() -> None:
    explicit = {"name": "images", "dtype": "UINT8", "layout": "NHWC", "height_px": 224, "width_px": 224}
    with pytest.raises(SpecMismatch) as caught:
        fit({"input": explicit, "output_name": "probabilities"}, classifier())

    message = caught.value.message
    assert caught.value.code == Code.FAILED_PRECONDITION
    assert "spec says input 'images' UINT8 NHWC 224x224, output 'probabilities'" in message
    assert f"model.onnx version 1 at {URI} has input 'x' FP32 [N,3,320,320]; output 'probs' FP32 [N,10]" in message
    assert "input name: spec 'images', graph 'x'" in message and "dtype: spec UINT8, graph FP32" in message
    assert "layout: spec NHWC puts the 3 channels at dimension 3, the graph has 320 there: it is NCHW" in message
    assert "output 'probabilities' is not in the graph" in message
    assert ("Pass --spec with input: {name: x, dtype: FP32, layout: NCHW, height_px: 320, width_px: 320}, "
            "output_name: probs") in message


def test_a_size_read_from_the_graph_must_fit_the_resize_the_spec_gives() -> None:
    with pytest.raises(SpecMismatch, match="resize_px.*below the crop 320 x 320"):
        fit({"input": {"resize_px": 256}}, classifier())


def test_dynamic_sizes_keep_the_spec_s_size() -> None:
    spec, inferred, _ = fit({}, classifier(("N", 3, "h", "w")))
    assert (spec.input.layout, spec.input.height_px, spec.input.width_px) == ("NCHW", 224, 224)
    assert "input.height_px" not in inferred


def test_a_graph_with_batch_fixed_at_one_gets_batches_of_one() -> None:
    spec, inferred, _ = fit({}, classifier((1, 3, 320, 320), output_shape=(1, 10)))
    assert spec.batching.max_batch_size == 1 and "batching.max_batch_size" in inferred
    with pytest.raises(SpecMismatch, match="batch dimension is fixed at 1 but batching.max_batch_size is 8"):
        fit({"batching": {"max_batch_size": 8}}, classifier((1, 3, 320, 320)))


@pytest.mark.parametrize(
    ("spec", "data", "problem"),
    [
        ({}, classifier(("N", 3, 320)), "the graph's input has rank 3; Flotilla sends rank 4"),
        ({}, classifier(extra_inputs=1), "the graph has 2 inputs ('x', 'extra0'); Flotilla feeds one image tensor"),
        ({}, classifier(("N", 1, 28, 28)), "the graph has 28 there"),
        ({}, classifier(input_type=TensorProto.INT64), "the graph's input is INT64; Flotilla sends UINT8 or FP32"),
        ({}, classifier((4, 3, 320, 320)), "batch dimension is fixed at 4; export it with a dynamic batch axis"),
        ({}, classifier(output_type=TensorProto.FLOAT16), "output 'probs' is FP16; Flotilla reads FP32 scores"),
        ({}, classifier(output_shape=("N", 10, 1, 1)), "output 'probs' has rank 4; Flotilla reads [batch, classes]"),
        ({"labels": ["cat", "dog"]}, classifier(), "2 labels for the 10 classes of output 'probs'"),
        ({"input": {"height_px": 300}}, classifier(), "size: spec 300x320, graph 320x320"),
    ],
)
def test_each_mismatch_is_named(spec: dict[str, object], data: bytes, problem: str) -> None:
    with pytest.raises(SpecMismatch) as caught:
        fit(spec, data)
    assert problem in caught.value.message


def test_every_version_is_checked_against_the_one_spec() -> None:
    with pytest.raises(SpecMismatch, match="model.onnx version 2 .* size: spec 320x320, graph 256x256"):
        fit({"versions": [1, 2], "default_version": 1}, classifier(), classifier(("N", 3, 256, 256)))


class MemoryObjectStore:
    """The few ObjectStore calls ArtifactStore makes, in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.gets = 0

    def ensure_bucket(self) -> None:
        return None

    def put(self, key: str, data: bytes, content_type: str = "") -> None:
        self.objects[key] = data

    def get(self, key: str, max_bytes: int) -> bytes:
        self.gets += 1
        if key not in self.objects:
            raise ImageNotFound(key)
        return self.objects[key]

    def size(self, key: str) -> int | None:
        return len(self.objects[key]) if key in self.objects else None


def test_the_artifact_store_reads_each_graph_once_per_checksum(tmp_path: Path) -> None:
    store = MemoryObjectStore()
    artifacts = ArtifactStore(lambda bucket: store)  # type: ignore[arg-type,return-value]
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(classifier())
    manifest = artifacts.upload(tmp_path, URI)

    assert artifacts.graph(URI, 1, manifest).inputs[0].name == "x"
    gets = store.gets
    assert artifacts.graph(URI, 1, manifest).inputs[0].name == "x"
    assert store.gets == gets, "the same checksum is not downloaded again"

    store.objects["m/1/model.onnx"] = onnx.load_from_string(classifier(input_name="y")).SerializeToString()
    changed = {"1/model.onnx": {"sha256": "0" * 64, "bytes": 1}}
    with pytest.raises(ArtifactUnavailable, match="fails its checksum"):
        artifacts.graph(URI, 1, changed)
