"""What a model.onnx graph declares about its input and output, and whether a spec fits it.

A deploy reads each version's graph (names, element types and shapes of its
inputs and outputs; no weights are looked at and nothing is run) and:

1. fills in what the spec leaves unset and the graph says: the input's
   name, dtype, layout (where the one dimension of 3 channels is) and fixed
   height and width, the output's name when the graph has one output, and
   ``batching.max_batch_size`` 1 for a graph whose batch dimension is fixed
   at 1. What a graph cannot say (channel order, resize, scale, mean/std,
   output kind) stays the spec's.
2. checks the spec against every version's graph: one input, its name,
   dtype UINT8 or FP32, rank 4, 3 channels where the layout puts them,
   fixed sizes equal to the spec's, a batch dimension that takes the
   batcher's batches; the output's name among the graph's, FP32, rank 2 and
   as many classes as labels. A mismatch is ``SpecMismatch``
   (FAILED_PRECONDITION) naming both sides and the spec that would fit.

Without this a spec that does not match deploys as Ready and every call
fails INTERNAL in ONNX Runtime ("Required inputs (['x']) are missing").
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from flotilla.config import GRAPH_FILLED_SETTINGS, BatchingSettings, InputSpec, ModelSettings
from flotilla.errors import ArtifactUnavailable, FailedPrecondition

CHANNELS = 3
"""Flotilla sends colour images: 3 channels."""

# ONNX element types in the names Flotilla and Triton use.
_DTYPES = {
    "FLOAT": "FP32", "UINT8": "UINT8", "FLOAT16": "FP16", "BFLOAT16": "BF16", "DOUBLE": "FP64",
    "INT8": "INT8", "INT16": "INT16", "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL", "STRING": "BYTES",
}
INPUT_DTYPES = ("UINT8", "FP32")
"""What the preprocess workers make (InputSpec.dtype)."""
INFERRED_INPUT_FIELDS = tuple(path[1] for path in GRAPH_FILLED_SETTINGS if path[0] == "input")
"""The input settings a graph can say; the rest (channel order, resize, normalisation) only a spec can."""

Dim = int | str | None
"""A dimension: fixed (int), symbolic (its name) or unknown (None)."""


class SpecMismatch(FailedPrecondition):
    """The model spec does not match the model's ONNX graph (input or output name, dtype, shape)."""


@dataclass(frozen=True)
class TensorInfo:
    """One input or output as the graph declares it."""

    name: str
    dtype: str
    """Flotilla/Triton name of the element type (FP32, UINT8, ...), or the ONNX one when it has none."""
    shape: tuple[Dim, ...] | None
    """None when the graph declares no shape."""

    def dim(self, index: int) -> Dim:
        return self.shape[index] if self.shape is not None and -len(self.shape) <= index < len(self.shape) else None

    def describe(self) -> str:
        """``'x' FP32 [N,3,320,320]``: a symbolic or unknown batch dimension reads N, others their name or ?."""
        if self.shape is None:
            return f"{self.name!r} {self.dtype} (shape not declared)"
        dims = [str(d) if isinstance(d, int) else ("N" if i == 0 else d or "?") for i, d in enumerate(self.shape)]
        return f"{self.name!r} {self.dtype} [{','.join(dims)}]"


@dataclass(frozen=True)
class ModelGraph:
    """The inputs (initializers excluded) and outputs of one model.onnx."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    def output(self, name: str) -> TensorInfo | None:
        return next((o for o in self.outputs if o.name == name), None)

    def describe(self) -> str:
        ins = ", ".join(i.describe() for i in self.inputs) or "none"
        outs = ", ".join(o.describe() for o in self.outputs) or "none"
        return f"input {ins}; output {outs}"


def _tensor(value: onnx.ValueInfoProto) -> TensorInfo:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorInfo(value.name, f"({kind or 'untyped'})", None)
    tensor = value.type.tensor_type
    onnx_dtype = onnx.TensorProto.DataType.Name(tensor.elem_type)
    shape: tuple[Dim, ...] | None = None
    if tensor.HasField("shape"):
        dims: list[Dim] = []
        for d in tensor.shape.dim:
            which = d.WhichOneof("value")
            dims.append(d.dim_value if which == "dim_value" else d.dim_param if which == "dim_param" else None)
        shape = tuple(dims)
    return TensorInfo(value.name, _DTYPES.get(onnx_dtype, onnx_dtype), shape)


def read_graph(data: bytes, where: str) -> ModelGraph:
    """The graph of a serialized ONNX model; ArtifactUnavailable (FAILED_PRECONDITION) when it is not one."""
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ArtifactUnavailable(
            f"{where} is not a readable ONNX model ({type(exc).__name__}: {exc}); export it again "
            "(e.g. torch.onnx.export) and upload it with `flotilla models upload`"
        ) from exc
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = tuple(_tensor(v) for v in graph.input if v.name not in initializers)
    if not model.HasField("graph") or not inputs or not graph.output:
        raise ArtifactUnavailable(
            f"{where} is not a readable ONNX model (it declares no graph input or output); export it again "
            "(e.g. torch.onnx.export) and upload it with `flotilla models upload`"
        )
    return ModelGraph(inputs, tuple(_tensor(v) for v in graph.output))


def describe_spec(spec: ModelSettings) -> str:
    """``input 'images' UINT8 NHWC 224x224, output 'probabilities'``: the spec's side of a comparison."""
    i = spec.input
    return f"input {i.name!r} {i.dtype} {i.layout} {i.height_px}x{i.width_px}, output {spec.output_name!r}"


def _layout_of(tensor: TensorInfo) -> str | None:
    """NCHW or NHWC when exactly one of dimensions 1 and 3 is 3 channels; None when the shape does not say."""
    if tensor.shape is None or len(tensor.shape) != 4:
        return None
    first, last = tensor.shape[1] == CHANNELS, tensor.shape[3] == CHANNELS
    if first == last:
        return None
    return "NCHW" if first else "NHWC"


def _hw(layout: str) -> tuple[int, int]:
    """Positions of height and width in a rank-4 tensor of that layout."""
    return (2, 3) if layout == "NCHW" else (1, 2)


@dataclass(frozen=True)
class GraphFit:
    """What a deploy learned from the graphs: the fields it filled in and a sentence for the status."""

    inferred: tuple[str, ...]
    """Spec fields filled in from the graph (``input.name``, ``output_name``, ...)."""
    message: str


def fit_spec(spec: ModelSettings, graphs: dict[int, ModelGraph], where: str) -> tuple[ModelSettings, GraphFit]:
    """``spec`` with its unset input/output settings read from the graph of the served version, once
    it matches every version's graph; SpecMismatch naming both sides otherwise.

    ``graphs`` maps each version to its graph; ``where`` is the artifact's URI (for messages). A field
    counts as set when the spec names it (pydantic's ``model_fields_set``): a spec that says
    ``input: {name: x}`` keeps that name and gets the rest from the graph.
    """
    version = spec.served_version if spec.served_version in graphs else min(graphs)
    graph = graphs[version]
    spec, inferred = _infer(spec, graph, f"{where} version {version}")
    for v in sorted(graphs):
        problems = check_spec(spec, graphs[v])
        if problems:
            raise SpecMismatch(_mismatch_message(spec, graphs[v], v, where, problems, inferred))
    listed = ", ".join(map(str, sorted(graphs)))
    read = f"read from the graph: {', '.join(inferred)}" if inferred else "all given by the spec"
    message = (
        f"model.onnx {'version' if len(graphs) == 1 else 'versions'} {listed} ({graph.describe()}) "
        f"match{'es' if len(graphs) == 1 else ''} {describe_spec(spec)} ({read}; channel order, resize "
        "and normalisation are the spec's)"
    )
    return spec, GraphFit(tuple(inferred), message)


def _infer(spec: ModelSettings, graph: ModelGraph, where: str) -> tuple[ModelSettings, list[str]]:
    given = spec.input.model_fields_set
    values: dict[str, object] = {}
    if len(graph.inputs) == 1:
        tensor = graph.inputs[0]
        if "name" not in given:
            values["name"] = tensor.name
        if "dtype" not in given and tensor.dtype in INPUT_DTYPES:
            values["dtype"] = tensor.dtype
        layout = spec.input.layout if "layout" in given else _layout_of(tensor)
        if "layout" not in given and layout is not None:
            values["layout"] = layout
        if layout is not None and tensor.shape is not None and len(tensor.shape) == 4:
            h, w = (tensor.shape[i] for i in _hw(layout))
            if "height_px" not in given and isinstance(h, int) and h > 0:
                values["height_px"] = h
            if "width_px" not in given and isinstance(w, int) and w > 0:
                values["width_px"] = w
    inferred = [f"input.{k}" for k in INFERRED_INPUT_FIELDS if k in values]
    update: dict[str, object] = {}
    try:
        if values:
            update["input"] = InputSpec.model_validate({**spec.input.model_dump(exclude_unset=True), **values})
        if "output_name" not in spec.model_fields_set and len(graph.outputs) == 1:
            update["output_name"] = graph.outputs[0].name
            inferred.append("output_name")
        batching = spec.batching
        if (len(graph.inputs) == 1 and graph.inputs[0].dim(0) == 1
                and "max_batch_size" not in batching.model_fields_set and batching.max_batch_size != 1):
            update["batching"] = BatchingSettings.model_validate(
                {**batching.model_dump(exclude_unset=True), "max_batch_size": 1}
            )
            inferred.append("batching.max_batch_size")
    except ValidationError as exc:
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise SpecMismatch(
            f"the spec does not fit the graph of {where} ({graph.describe()}) with the settings read from it "
            f"({', '.join(inferred)}): {problems}; give these settings in --spec"
        ) from exc
    return (spec.model_copy(update=update) if update else spec), inferred


def check_spec(spec: ModelSettings, graph: ModelGraph) -> list[str]:
    """What does not match between ``spec`` and ``graph``, one phrase each; empty when it fits."""
    problems: list[str] = []
    want = spec.input
    if len(graph.inputs) != 1:
        names = ", ".join(repr(i.name) for i in graph.inputs)
        problems.append(f"the graph has {len(graph.inputs)} inputs ({names}); Flotilla feeds one image tensor")
    else:
        tensor = graph.inputs[0]
        if tensor.name != want.name:
            problems.append(f"input name: spec {want.name!r}, graph {tensor.name!r}")
        if tensor.dtype not in INPUT_DTYPES:
            problems.append(f"the graph's input is {tensor.dtype}; Flotilla sends UINT8 or FP32 (convert the model's input)")
        elif tensor.dtype != want.dtype:
            problems.append(f"dtype: spec {want.dtype}, graph {tensor.dtype}")
        problems += _shape_problems(spec, tensor)
    output = graph.output(spec.output_name)
    if output is None:
        names = ", ".join(repr(o.name) for o in graph.outputs)
        problems.append(f"output {spec.output_name!r} is not in the graph (its outputs: {names})")
    else:
        if output.dtype != "FP32":
            problems.append(f"output {output.name!r} is {output.dtype}; Flotilla reads FP32 scores")
        if output.shape is not None and len(output.shape) != 2:
            problems.append(f"output {output.name!r} has rank {len(output.shape)}; Flotilla reads [batch, classes]")
        classes = output.dim(1) if output.shape is not None and len(output.shape) == 2 else None
        if isinstance(classes, int) and spec.labels and len(spec.labels) != classes:
            problems.append(f"{len(spec.labels)} labels for the {classes} classes of output {output.name!r}")
    return problems


def _shape_problems(spec: ModelSettings, tensor: TensorInfo) -> list[str]:
    want = spec.input
    if tensor.shape is None:
        return []  # nothing declared, nothing to check; ONNX Runtime checks at the warm-up
    if len(tensor.shape) != 4:
        return [f"the graph's input has rank {len(tensor.shape)}; Flotilla sends rank 4 ({want.layout})"]
    problems = []
    channel = 1 if want.layout == "NCHW" else 3
    if isinstance(tensor.shape[channel], int) and tensor.shape[channel] != CHANNELS:
        actual = _layout_of(tensor)
        hint = f": it is {actual}" if actual else ""
        problems.append(f"layout: spec {want.layout} puts the 3 channels at dimension {channel}, the graph has "
                        f"{tensor.shape[channel]} there{hint}")
    else:
        h, w = (tensor.shape[i] for i in _hw(want.layout))
        if (isinstance(h, int) and h != want.height_px) or (isinstance(w, int) and w != want.width_px):
            problems.append(f"size: spec {want.height_px}x{want.width_px}, graph {h or '?'}x{w or '?'}")
    batch = tensor.shape[0]
    if isinstance(batch, int) and batch != 1:
        problems.append(f"the graph's batch dimension is fixed at {batch}; export it with a dynamic batch axis "
                        "(batches have 1..batching.max_batch_size images)")
    elif batch == 1 and spec.batching.max_batch_size != 1:
        problems.append(f"the graph's batch dimension is fixed at 1 but batching.max_batch_size is "
                        f"{spec.batching.max_batch_size}; set it to 1 or export with a dynamic batch axis")
    return problems


def _mismatch_message(
    spec: ModelSettings, graph: ModelGraph, version: int, where: str, problems: list[str], inferred: list[str]
) -> str:
    fix = _suggested_spec(spec, graph)
    read = f" ({', '.join(inferred)} read from the graph)" if inferred else ""
    return (
        f"the spec does not match the model: spec says {describe_spec(spec)}{read}; model.onnx version {version} "
        f"at {where} has {graph.describe()}: {'; '.join(problems)}. "
        + (f"Pass --spec with {fix}, or leave those settings out to read them from the graph"
           if fix else "Export the model again with one 4-d image input and a [batch, classes] FP32 output")
    )


def _suggested_spec(spec: ModelSettings, graph: ModelGraph) -> str:
    """The spec settings the graph determines, as YAML flow mappings (empty when it determines none)."""
    parts: list[str] = []
    if len(graph.inputs) == 1:
        tensor = graph.inputs[0]
        fields = [f"name: {tensor.name}"]
        if tensor.dtype in INPUT_DTYPES:
            fields.append(f"dtype: {tensor.dtype}")
        layout = _layout_of(tensor)
        if layout is not None:
            fields.append(f"layout: {layout}")
            assert tensor.shape is not None
            h, w = (tensor.shape[i] for i in _hw(layout))
            if isinstance(h, int):
                fields.append(f"height_px: {h}")
            if isinstance(w, int):
                fields.append(f"width_px: {w}")
        parts.append(f"input: {{{', '.join(fields)}}}")
        if tensor.dim(0) == 1:
            parts.append("batching: {max_batch_size: 1}")
    if graph.output(spec.output_name) is None and len(graph.outputs) == 1:
        parts.append(f"output_name: {graph.outputs[0].name}")
    return ", ".join(parts)
