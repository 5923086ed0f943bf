"""Fuzz: the object bytes a preprocess worker hands to the JPEG decoder (``imaging.decode_for_model``),
as real JPEGs mutated: bits flipped, cut short, segments spliced in, the frame's declared size changed.

The decoder answers model-ready pixels or an ``InvalidImage``/``ImageTooLarge`` (INVALID_ARGUMENT),
never another error (the worker would answer INTERNAL) and never a crash; an image declaring more than
``max_pixels`` is refused from its header, before a pixel is allocated.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from flotilla.config import InputSpec
from flotilla.errors import Code, ImageTooLarge, InvalidArgument
from flotilla.services.preprocess import imaging
from flotilla.services.preprocess.imaging import decode_for_model

SAMPLES = Path(__file__).resolve().parents[2] / "build" / "samples"
NAMES = ["chelsea.jpg", "rocket.jpg", "documents/page-rot90.jpg"]
"""Small photos, one of them with an EXIF orientation (the APP1 segment is parsed too)."""
MAX_PIXELS = 50_000_000
"""The worker's default ``preprocess.max_image_pixels``."""
SPECS = [InputSpec(), InputSpec(resize="center_crop", height_px=96, width_px=160)]
SOF_MARKERS = {0xC0, 0xC1, 0xC2}


def sample(name: str) -> bytes:
    path = SAMPLES / name
    if not path.exists():
        pytest.fail(f"{path} is missing; run `make samples` (make test does it)")
    return path.read_bytes()


def frame_header_offset(data: bytes) -> int:
    """Where the frame header's height field is (after the SOFn marker, its length and precision)."""
    pos = 2
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in SOF_MARKERS:
            return pos + 5
        pos += 2 + length
    raise AssertionError("no frame header")


def declaring(data: bytes, height: int, width: int) -> bytes:
    """``data`` with its frame header declaring ``height`` x ``width``."""
    at = frame_header_offset(data)
    return data[:at] + struct.pack(">HH", height, width) + data[at + 4:]


@st.composite
def mutated_jpegs(draw: st.DrawFn) -> bytes:
    data = bytearray(sample(draw(st.sampled_from(NAMES))))
    # Most mutations land in the headers (the first few hundred bytes), where parsing happens.
    position = st.one_of(st.integers(0, min(len(data) - 1, 700)), st.integers(0, len(data) - 1))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["flip", "cut", "splice", "declare", "byte"]))
        if how == "flip" and data:
            data[draw(position) % len(data)] ^= 1 << draw(st.integers(0, 7))
        elif how == "byte" and data:
            data[draw(position) % len(data)] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[draw(st.integers(0, len(data))):]
        elif how == "splice":
            marker = draw(st.sampled_from([0xE1, 0xDB, 0xC4, 0xC0, 0xDA, 0xD9, 0xDD, 0xFE]) | st.integers(0, 255))
            body = draw(st.binary(max_size=40))
            length = draw(st.just(len(body) + 2) | st.integers(0, 0xFFFF))
            at = draw(position) % (len(data) + 1)
            data[at:at] = bytes([0xFF, marker]) + struct.pack(">H", length) + body
        elif how == "declare":
            try:
                data = bytearray(declaring(bytes(data), draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))))
            except (AssertionError, struct.error):
                pass
    return bytes(data)


@given(mutated_jpegs(), st.sampled_from(SPECS))
@example(declaring(sample("chelsea.jpg"), 60_000, 60_000), SPECS[0])  # a 3.6 gigapixel bomb in 35 KB
@example(declaring(sample("chelsea.jpg"), 0, 0), SPECS[0])
@example(sample("chelsea.jpg")[:600], SPECS[1])
def test_a_mutated_jpeg_decodes_or_is_an_invalid_argument(data: bytes, spec: InputSpec) -> None:
    try:
        pixels = decode_for_model(data, spec, what="image fuzz", max_pixels=MAX_PIXELS)
    except InvalidArgument as exc:
        assert exc.code == Code.INVALID_ARGUMENT
        return
    assert pixels.shape == (spec.height_px, spec.width_px, 3) and pixels.dtype == np.uint8


def test_a_jpeg_declaring_60000_by_60000_is_refused_before_any_pixel_is_allocated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bomb = declaring(sample("chelsea.jpg"), 60_000, 60_000)

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(imaging.simplejpeg, "decode_jpeg", no_decode)
    with pytest.raises(ImageTooLarge, match="60000x60000 = 3600000000 pixels"):
        decode_for_model(bomb, InputSpec(), what="image bomb", max_pixels=MAX_PIXELS)
