"""JPEG bytes → model-ready pixels, and pixels → one batch tensor.

Decoding is DCT-scaled: libjpeg-turbo (through simplejpeg) decodes straight
to the smallest power-of-two reduction that still covers the model's input,
so a 12 MP photo never exists at full size in memory. Pillow then resizes
the small image to the exact input size. Both release the GIL, so a thread
pool decodes the images of a batch in parallel.
"""

from __future__ import annotations

import math

import numpy as np
import simplejpeg
from PIL import Image

from flotilla.config import InputSpec
from flotilla.errors import ImageTooLarge, InvalidImage

_JPEG_MAGIC = b"\xff\xd8\xff"


def read_jpeg_size(data: bytes, what: str, max_pixels: int) -> tuple[int, int]:
    """(height, width) from the JPEG header; rejects non-JPEGs and decompression bombs."""
    if not data:
        raise InvalidImage(f"{what} is empty (0 bytes); upload a JPEG image")
    if not data.startswith(_JPEG_MAGIC):
        raise InvalidImage(
            f"{what} is not a JPEG (it starts with {data[:4].hex(' ')}, a JPEG starts with ff d8 ff)"
        )
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise InvalidImage(f"{what} has an unreadable JPEG header: {exc}") from exc
    if height * width > max_pixels:
        raise ImageTooLarge(
            f"{what} declares {width}x{height} = {width * height} pixels; "
            f"the limit is {max_pixels} pixels"
        )
    return height, width


def _scaled_cover(height: int, width: int, spec: InputSpec) -> tuple[int, int]:
    """Smallest (h, w) the decoded image must cover for this spec's resize."""
    if spec.resize == "stretch":
        return min(height, spec.height_px), min(width, spec.width_px)
    # center_crop: the short side is scaled to crop / crop_fraction.
    short_target = max(spec.height_px, spec.width_px) / spec.crop_fraction
    scale = min(1.0, short_target / min(height, width))
    return math.ceil(height * scale), math.ceil(width * scale)


def _crop_box(height: int, width: int, spec: InputSpec) -> tuple[float, float, float, float]:
    """The centred region (left, top, right, bottom) that center_crop keeps."""
    side = min(height, width) * spec.crop_fraction
    aspect = spec.width_px / spec.height_px
    box_h, box_w = (side, side * aspect) if aspect <= 1 else (side / aspect, side)
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return left, top, left + box_w, top + box_h


def decode_for_model(data: bytes, spec: InputSpec, *, what: str, max_pixels: int) -> np.ndarray:
    """Decode a JPEG into an RGB uint8 array of shape (height_px, width_px, 3)."""
    height, width = read_jpeg_size(data, what, max_pixels)
    min_h, min_w = _scaled_cover(height, width, spec)
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=min_h, min_width=min_w, strict=True
        )
    except ValueError as exc:
        raise InvalidImage(f"{what} is not a decodable JPEG (truncated or corrupt): {exc}") from exc
    image = Image.fromarray(pixels)
    size = (spec.width_px, spec.height_px)
    if spec.resize == "stretch":
        resized = image.resize(size, Image.Resampling.BILINEAR)
    else:
        box = _crop_box(image.height, image.width, spec)
        resized = image.resize(size, Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized, dtype=np.uint8)


def to_batch_tensor(images: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Stack (H, W, 3) uint8 images into the model's batch tensor.

    UINT8 keeps the raw pixels (4x smaller on the wire than FP32; the model
    normalises). FP32 applies ``(pixel - mean) / std`` per RGB channel.
    """
    batch = np.stack(images)
    if spec.dtype == "FP32":
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
        batch = (batch.astype(np.float32) - mean) / std
    if spec.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch)


def top_k(probabilities: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best (class index, score) pairs of one row, best first."""
    k = min(k, probabilities.shape[-1])
    best = np.argpartition(-probabilities, k - 1)[:k]
    best = best[np.argsort(-probabilities[best], kind="stable")]
    return [(int(i), float(probabilities[i])) for i in best]
