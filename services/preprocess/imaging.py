"""JPEG bytes → model-ready pixels, pixels → one batch tensor, scores → probabilities.

Decoding is DCT-scaled: libjpeg-turbo (through simplejpeg) decodes straight
to the smallest power-of-two reduction that still covers what the resize
needs, so a 12 MP photo never exists at full size in memory. Pillow then
resizes the small image to the exact input size. Both release the GIL, so a
thread pool decodes the images of a batch in parallel.

The EXIF orientation that phones write is read from the APP1 header bytes
alone (no pixels), the image is decoded once in its stored orientation, and
the decoded pixels are turned upright before the resize.

Everything model-specific (size, resize rule, channel order, normalisation)
is data in ``InputSpec``; nothing here knows a model by name.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import simplejpeg
from numpy.typing import NDArray
from PIL import Image

from flotilla.config import InputSpec
from flotilla.errors import ImageTooLarge, InvalidImage

_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_HEADER = b"Exif\x00\x00"
_ORIENTATION_TAG = 0x0112
_TIFF_SHORT = 3
# EXIF orientation -> the transpose that turns the stored pixels upright
# (the same table as PIL.ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
Box = tuple[float, float, float, float]


def read_jpeg_size(data: bytes | bytearray, what: str, max_pixels: int) -> tuple[int, int]:
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


def read_exif_orientation(data: bytes | bytearray) -> int:
    """The EXIF orientation (1..8) of a JPEG, from its APP1 segment; 1 when absent or unreadable.

    Walks the marker segments up to the first scan and reads tag 0x0112 of
    the TIFF structure's IFD0. Never touches the entropy-coded pixels.
    """
    pos = 2  # after SOI
    size = len(data)
    try:
        while pos + 4 <= size:
            if data[pos] != 0xFF:
                return 1  # not a marker: a broken header, no orientation to trust
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
                pos += 2
                continue
            if marker in (0xDA, 0xD9):  # start of scan / end of image: no EXIF before it
                return 1
            (length,) = struct.unpack_from(">H", data, pos + 2)
            start = pos + 4
            if marker == 0xE1 and data.startswith(_EXIF_HEADER, start):
                found = _tiff_orientation(data[start + len(_EXIF_HEADER) : pos + 2 + length])
                if found:
                    return found
            pos += 2 + length
    except struct.error:
        pass
    return 1


def _tiff_orientation(tiff: bytes | bytearray) -> int:
    """Orientation tag of IFD0 in a TIFF structure; 0 when it has none."""
    if tiff[:2] == b"II":
        order = "<"
    elif tiff[:2] == b"MM":
        order = ">"
    else:
        return 0
    magic, ifd0 = struct.unpack_from(order + "HI", tiff, 2)
    if magic != 42:
        return 0
    (count,) = struct.unpack_from(order + "H", tiff, ifd0)
    for entry in range(ifd0 + 2, ifd0 + 2 + 12 * count, 12):
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        if tag == _ORIENTATION_TAG:
            if kind != _TIFF_SHORT:
                return 0
            (value,) = struct.unpack_from(order + "H", tiff, entry + 8)
            return value if 1 <= value <= 8 else 0
    return 0


def _scaled_cover(height: int, width: int, spec: InputSpec) -> tuple[int, int]:
    """Smallest (h, w) the decoded image must cover for this spec's resize.

    ``height`` and ``width`` are the upright image's; the whole frame is
    decoded, so the cover is the size the resize scales the whole frame to
    (or the image's own size, never more: DCT scaling only shrinks).
    """
    if spec.resize == "stretch":
        if spec.resize_px is None:
            return min(height, spec.height_px), min(width, spec.width_px)
        return min(height, spec.resize_px), min(width, spec.resize_px)
    if spec.resize_px is None:  # the short side is scaled to crop / crop_fraction
        short_target = max(spec.height_px, spec.width_px) / spec.crop_fraction
    else:
        short_target = spec.resize_px
    scale = min(1.0, short_target / min(height, width))
    return math.ceil(height * scale), math.ceil(width * scale)


def _crop_fraction_box(height: int, width: int, spec: InputSpec) -> Box:
    """The centred region (left, top, right, bottom) that center_crop with crop_fraction keeps."""
    side = min(height, width) * spec.crop_fraction
    aspect = spec.width_px / spec.height_px
    box_h, box_w = (side, side * aspect) if aspect <= 1 else (side / aspect, side)
    left, top = (width - box_w) / 2, (height - box_h) / 2
    return left, top, left + box_w, top + box_h


def _resize_box(height: int, width: int, decoded: tuple[int, int], spec: InputSpec) -> Box:
    """The region of the decoded image that becomes the model input, in decoded pixels.

    ``height`` x ``width`` is the upright image at full size, ``decoded``
    the (h, w) it was decoded to. A resize followed by a centre crop is one
    resize of the cropped region (Pillow's ``box``), which computes only the
    pixels kept; the crop offsets are whole pixels of the resized image, as
    the reference pipelines slice them.
    """
    dec_h, dec_w = decoded
    resize_px = spec.resize_px
    if resize_px is None:
        if spec.resize == "stretch":
            return 0.0, 0.0, float(dec_w), float(dec_h)
        return _crop_fraction_box(dec_h, dec_w, spec)
    if spec.resize == "stretch":
        mid_h = mid_w = resize_px
    else:
        short = min(height, width)
        mid_h, mid_w = round(height * resize_px / short), round(width * resize_px / short)
    top, left = (mid_h - spec.height_px) // 2, (mid_w - spec.width_px) // 2
    sy, sx = dec_h / mid_h, dec_w / mid_w
    return left * sx, top * sy, (left + spec.width_px) * sx, (top + spec.height_px) * sy


def decode_for_model(
    data: bytes | bytearray, spec: InputSpec, *, what: str, max_pixels: int, out: NDArray[np.uint8] | None = None
) -> NDArray[np.uint8]:
    """Decode a JPEG into an upright RGB uint8 array of shape (height_px, width_px, 3).

    With ``out`` (such an array, e.g. one row of a batch) the pixels are
    written there and ``out`` is returned: no per-image array to stack later.
    """
    stored_h, stored_w = read_jpeg_size(data, what, max_pixels)
    orientation = read_exif_orientation(data) if spec.apply_exif_orientation else 1
    swapped = orientation >= 5  # 5..8 turn the image a quarter: height and width trade places
    height, width = (stored_w, stored_h) if swapped else (stored_h, stored_w)
    min_h, min_w = _scaled_cover(height, width, spec)
    if swapped:
        min_h, min_w = min_w, min_h
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=min_h, min_width=min_w, strict=True
        )
    except ValueError as exc:
        raise InvalidImage(f"{what} is not a decodable JPEG (truncated or corrupt): {exc}") from exc
    image = Image.fromarray(pixels)
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
    box = _resize_box(height, width, (image.height, image.width), spec)
    resized = np.asarray(image.resize((spec.width_px, spec.height_px), Image.Resampling.BILINEAR, box=box))
    if out is None:
        return resized
    out[...] = resized
    return out


def to_batch_tensor(images: list[NDArray[np.uint8]], spec: InputSpec) -> NDArray[Any]:
    """Stack (H, W, 3) RGB uint8 images into the model's batch tensor (see ``batch_to_tensor``)."""
    return batch_to_tensor(np.stack(images), spec)


def batch_to_tensor(batch: NDArray[Any], spec: InputSpec) -> NDArray[Any]:
    """A (N, H, W, 3) RGB uint8 batch as the model's batch tensor.

    Channels go into ``spec.channel_order``. UINT8 keeps the raw pixels (4x
    smaller on the wire than FP32; the model normalises). FP32 computes
    ``(pixel * scale - mean) / std`` per channel, mean and std in the
    tensor's channel order. An RGB NHWC UINT8 model takes ``batch`` as it is.
    """
    if spec.channel_order == "BGR":
        batch = batch[..., ::-1]
    if spec.dtype == "FP32":
        std = np.asarray(spec.std, dtype=np.float64)
        # One multiply-add per value: x * (scale / std) - mean / std.
        gain = (spec.scale / std).astype(np.float32)
        offset = (-np.asarray(spec.mean, dtype=np.float64) / std).astype(np.float32)
        batch = batch.astype(np.float32)
        batch *= gain
        batch += offset
    if spec.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch)


def scores_to_probabilities(scores: NDArray[Any], kind: str) -> NDArray[Any]:
    """Per-class probabilities from a model's output rows (the last axis is the classes).

    ``kind`` is ``ModelSettings.output_kind``: "probabilities" are returned
    as they are; "logits" go through a numerically stable softmax.
    """
    if kind == "probabilities":
        return scores
    if kind != "logits":
        raise ValueError(f"unknown output kind {kind!r} (expected 'probabilities' or 'logits')")
    scores = np.asarray(scores, dtype=np.result_type(scores, np.float32))
    exp = np.exp(scores - scores.max(axis=-1, keepdims=True))  # the largest exponent is 0: no overflow
    probabilities: NDArray[Any] = exp / exp.sum(axis=-1, keepdims=True)
    return probabilities


def top_k_rows(probabilities: NDArray[Any], ks: list[int]) -> list[list[tuple[int, float]]]:
    """``top_k`` of every row at once: row i's ``ks[i]`` best (class index, score) pairs, best first."""
    classes = probabilities.shape[-1]
    widest = min(max(ks), classes)
    best = np.argpartition(-probabilities, widest - 1, axis=-1)[:, :widest]
    scores = np.take_along_axis(probabilities, best, axis=-1)
    order = np.argsort(-scores, axis=-1, kind="stable")
    indices = np.take_along_axis(best, order, axis=-1).tolist()
    values = np.take_along_axis(scores, order, axis=-1).tolist()
    return [list(zip(i[:k], v[:k], strict=True)) for i, v, k in zip(indices, values, ks, strict=True)]


def top_k(probabilities: NDArray[Any], k: int) -> list[tuple[int, float]]:
    """The k best (class index, score) pairs of one row, best first."""
    k = min(k, probabilities.shape[-1])
    best = np.argpartition(-probabilities, k - 1)[:k]
    best = best[np.argsort(-probabilities[best], kind="stable")]
    return [(int(i), float(probabilities[i])) for i in best]
