"""JPEG decoding, resizing, batching and top-k for the preprocess worker."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageOps
from pydantic import ValidationError

from flotilla.config import InputSpec
from flotilla.errors import Code, ImageTooLarge, InvalidImage
from flotilla.services.preprocess import imaging
from flotilla.services.preprocess.imaging import (
    decode_for_model,
    read_exif_orientation,
    read_jpeg_size,
    scores_to_probabilities,
    to_batch_tensor,
    top_k,
)

SAMPLE = Path(__file__).resolve().parents[2] / "build" / "samples" / "chelsea.jpg"
NO_LIMIT = 10**9


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def gradient(height: int, width: int) -> np.ndarray:
    """R rises left to right, G rises top to bottom, B is constant."""
    red = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    green = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    blue = np.full_like(red, 128)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A real photo when the samples were built, else a noisy synthetic one."""
    if SAMPLE.exists():
        return SAMPLE.read_bytes()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 64, size=(300, 451, 3), dtype=np.uint8)
    return encode_jpeg(gradient(300, 451) // 2 + noise)


@pytest.fixture(scope="module")
def big_gradient() -> tuple[np.ndarray, bytes]:
    pixels = gradient(2000, 3000)
    return pixels, encode_jpeg(pixels)


# --- read_jpeg_size -----------------------------------------------------------


def test_header_gives_height_then_width() -> None:
    data = encode_jpeg(gradient(30, 70))
    assert read_jpeg_size(data, "image x", NO_LIMIT) == (30, 70)


def test_empty_bytes_are_invalid_and_the_message_names_the_image() -> None:
    with pytest.raises(InvalidImage, match="image e1 is empty") as info:
        read_jpeg_size(b"", "image e1", NO_LIMIT)
    assert info.value.code == Code.INVALID_ARGUMENT


def test_png_is_rejected_as_not_a_jpeg() -> None:
    buffer = io.BytesIO()
    Image.fromarray(gradient(8, 8)).save(buffer, format="PNG")
    with pytest.raises(InvalidImage, match="image p1 is not a JPEG") as info:
        read_jpeg_size(buffer.getvalue(), "image p1", NO_LIMIT)
    assert "89 50 4e 47" in info.value.message  # names the bytes it found


def test_jpeg_magic_with_a_garbage_header_is_invalid() -> None:
    with pytest.raises(InvalidImage, match="image g1 has an unreadable JPEG header"):
        read_jpeg_size(b"\xff\xd8\xff" + b"\x00" * 64, "image g1", NO_LIMIT)


def test_header_declaring_too_many_pixels_is_too_large() -> None:
    data = encode_jpeg(gradient(100, 200))
    with pytest.raises(ImageTooLarge, match="image big declares 200x100 = 20000 pixels") as info:
        read_jpeg_size(data, "image big", max_pixels=19_999)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert read_jpeg_size(data, "image big", max_pixels=20_000) == (100, 200)


def test_decompression_bomb_is_rejected_before_any_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode_jpeg(np.zeros((5000, 5000, 3), dtype=np.uint8), quality=10)

    def no_decode(*args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(imaging.simplejpeg, "decode_jpeg", no_decode)
    with pytest.raises(ImageTooLarge, match="25000000 pixels"):
        decode_for_model(data, InputSpec(), what="image bomb", max_pixels=24_000_000)


# --- decode_for_model -----------------------------------------------------------


@pytest.mark.parametrize("resize", ["stretch", "center_crop"])
def test_photo_decodes_to_the_input_size_as_rgb_uint8(photo: bytes, resize: str) -> None:
    spec = InputSpec(height_px=224, width_px=224, resize=resize)
    pixels = decode_for_model(photo, spec, what="image c", max_pixels=NO_LIMIT)
    assert pixels.shape == (224, 224, 3)
    assert pixels.dtype == np.uint8
    assert pixels.std() > 5  # an actual picture, not a flat fill


@pytest.mark.parametrize("resize", ["stretch", "center_crop"])
def test_non_square_input_size_is_height_by_width(photo: bytes, resize: str) -> None:
    spec = InputSpec(height_px=96, width_px=160, resize=resize)
    assert decode_for_model(photo, spec, what="image c", max_pixels=NO_LIMIT).shape == (96, 160, 3)


def test_large_jpeg_stretches_correctly(big_gradient: tuple[np.ndarray, bytes]) -> None:
    original, data = big_gradient
    pixels = decode_for_model(data, InputSpec(), what="image big", max_pixels=NO_LIMIT)

    reference = np.asarray(Image.fromarray(original).resize((224, 224), Image.Resampling.BILINEAR))
    difference = np.abs(pixels.astype(np.int16) - reference.astype(np.int16))
    assert difference.mean() < 2
    assert difference.max() <= 8


def test_large_jpeg_is_decoded_scaled_not_at_full_size(
    big_gradient: tuple[np.ndarray, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, data = big_gradient
    seen: list[tuple[int, int, tuple[int, ...]]] = []
    real_decode = simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        out = real_decode(*args, **kwargs)
        seen.append((kwargs.get("min_height", 0), kwargs.get("min_width", 0), out.shape))
        return out

    monkeypatch.setattr(imaging.simplejpeg, "decode_jpeg", spy)
    decode_for_model(data, InputSpec(), what="image big", max_pixels=NO_LIMIT)

    [(min_h, min_w, shape)] = seen
    assert (min_h, min_w) == (224, 224)
    assert 224 <= shape[0] < 2000 // 4 and 224 <= shape[1] < 3000 // 4


def test_center_crop_keeps_the_centre_of_a_landscape_image(big_gradient: tuple[np.ndarray, bytes]) -> None:
    _, data = big_gradient
    spec = InputSpec(resize="center_crop", crop_fraction=0.875)
    pixels = decode_for_model(data, spec, what="image big", max_pixels=NO_LIMIT).astype(np.float64)

    # The crop is 1750 x 1750 (0.875 of the 2000 short side), centred in 2000 x 3000.
    left, right = 625 / 3000 * 255, 2375 / 3000 * 255
    top, bottom = 125 / 2000 * 255, 1875 / 2000 * 255
    assert pixels[:, 0, 0].mean() == pytest.approx(left, abs=4)
    assert pixels[:, -1, 0].mean() == pytest.approx(right, abs=4)
    assert pixels[0, :, 1].mean() == pytest.approx(top, abs=4)
    assert pixels[-1, :, 1].mean() == pytest.approx(bottom, abs=4)


def test_stretch_keeps_the_whole_frame(big_gradient: tuple[np.ndarray, bytes]) -> None:
    _, data = big_gradient
    pixels = decode_for_model(data, InputSpec(resize="stretch"), what="image big", max_pixels=NO_LIMIT)
    # The left column is close to red 0, the bottom row close to green 255: nothing was cut off.
    assert pixels[:, 0, 0].mean() < 8
    assert pixels[-1, :, 1].mean() > 247


def test_small_image_is_scaled_up() -> None:
    data = encode_jpeg(gradient(20, 30))
    assert decode_for_model(data, InputSpec(), what="image s", max_pixels=NO_LIMIT).shape == (224, 224, 3)


def test_grayscale_jpeg_comes_out_as_rgb() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64), 200, dtype=np.uint8), mode="L").save(buffer, format="JPEG")
    pixels = decode_for_model(buffer.getvalue(), InputSpec(), what="image g", max_pixels=NO_LIMIT)
    assert pixels.shape == (224, 224, 3)
    assert np.abs(pixels.astype(int) - 200).max() <= 2


def test_truncated_jpeg_is_invalid_and_names_the_image(photo: bytes) -> None:
    with pytest.raises(InvalidImage, match="image t1 is not a decodable JPEG") as info:
        decode_for_model(photo[: len(photo) // 2], InputSpec(), what="image t1", max_pixels=NO_LIMIT)
    assert info.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("keep", ["first 20 bytes", "all but the end marker"])
def test_jpeg_cut_anywhere_is_invalid(photo: bytes, keep: str) -> None:
    data = photo[:20] if keep == "first 20 bytes" else photo[:-2]
    with pytest.raises(InvalidImage, match="image t2"):
        decode_for_model(data, InputSpec(), what="image t2", max_pixels=NO_LIMIT)


def test_progressive_jpeg_decodes_and_its_truncation_is_caught() -> None:
    buffer = io.BytesIO()
    Image.fromarray(gradient(400, 600)).save(buffer, format="JPEG", quality=90, progressive=True)
    data = buffer.getvalue()

    assert decode_for_model(data, InputSpec(), what="image p", max_pixels=NO_LIMIT).shape == (224, 224, 3)
    with pytest.raises(InvalidImage, match="image p"):
        decode_for_model(data[: len(data) // 2], InputSpec(), what="image p", max_pixels=NO_LIMIT)


def test_png_bytes_are_invalid_for_decode() -> None:
    buffer = io.BytesIO()
    Image.fromarray(gradient(8, 8)).save(buffer, format="PNG")
    with pytest.raises(InvalidImage, match="image p2"):
        decode_for_model(buffer.getvalue(), InputSpec(), what="image p2", max_pixels=NO_LIMIT)


def test_empty_bytes_are_invalid_for_decode() -> None:
    with pytest.raises(InvalidImage, match="image e2"):
        decode_for_model(b"", InputSpec(), what="image e2", max_pixels=NO_LIMIT)


# --- to_batch_tensor --------------------------------------------------------------


def random_images(count: int, height: int = 4, width: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(42)
    return [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(count)]


def test_uint8_nhwc_keeps_the_raw_pixels() -> None:
    images = random_images(3)
    batch = to_batch_tensor(images, InputSpec(dtype="UINT8", layout="NHWC"))
    assert batch.dtype == np.uint8
    assert batch.shape == (3, 4, 5, 3)
    np.testing.assert_array_equal(batch, np.stack(images))


def test_fp32_nchw_normalises_per_channel_then_transposes() -> None:
    images = random_images(2)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    batch = to_batch_tensor(images, InputSpec(dtype="FP32", layout="NCHW", mean=mean, std=std))

    reference = (np.stack(images).astype(np.float64) - np.array(mean)) / np.array(std)
    reference = reference.transpose(0, 3, 1, 2)
    assert batch.dtype == np.float32
    assert batch.shape == (2, 3, 4, 5)
    assert batch.flags.c_contiguous
    np.testing.assert_allclose(batch, reference, rtol=1e-5, atol=1e-5)


def test_fp32_nhwc_normalises_without_transposing() -> None:
    images = random_images(1)
    batch = to_batch_tensor(images, InputSpec(dtype="FP32", layout="NHWC", mean=(10, 20, 30), std=(2, 4, 8)))
    assert batch.shape == (1, 4, 5, 3)
    assert batch[0, 1, 2, 2] == pytest.approx((float(images[0][1, 2, 2]) - 30) / 8)


def test_uint8_nchw_transposes_without_normalising() -> None:
    images = random_images(1)
    batch = to_batch_tensor(images, InputSpec(dtype="UINT8", layout="NCHW", mean=(10, 20, 30)))
    assert batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], images[0].transpose(2, 0, 1))


# --- top_k ------------------------------------------------------------------------


def test_top_k_returns_the_best_classes_best_first() -> None:
    probabilities = np.array([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float32)
    best = top_k(probabilities, 3)
    assert [index for index, _ in best] == [1, 3, 4]
    assert [score for _, score in best] == pytest.approx([0.4, 0.3, 0.15])
    assert all(type(index) is int and type(score) is float for index, score in best)


def test_top_k_larger_than_the_class_count_returns_every_class_sorted() -> None:
    probabilities = np.array([0.2, 0.5, 0.3])
    assert [index for index, _ in top_k(probabilities, 10)] == [1, 2, 0]


def test_top_1_is_the_argmax() -> None:
    rng = np.random.default_rng(7)
    probabilities = rng.random(1000)
    assert top_k(probabilities, 1) == [(int(np.argmax(probabilities)), float(probabilities.max()))]


# --- spec options: channel order, scale -------------------------------------------


def test_bgr_uint8_reverses_the_channels() -> None:
    images = random_images(2)
    batch = to_batch_tensor(images, InputSpec(dtype="UINT8", channel_order="BGR"))
    np.testing.assert_array_equal(batch, np.stack(images)[..., [2, 1, 0]])


def test_bgr_fp32_nchw_applies_mean_and_std_in_the_tensors_channel_order() -> None:
    images = random_images(2)
    mean, std = (104.0, 117.0, 123.0), (2.0, 4.0, 8.0)  # for B, G, R
    spec = InputSpec(dtype="FP32", layout="NCHW", channel_order="BGR", mean=mean, std=std)
    batch = to_batch_tensor(images, spec)

    bgr = np.stack(images).astype(np.float64)[..., ::-1]
    reference = ((bgr - np.array(mean)) / np.array(std)).transpose(0, 3, 1, 2)
    assert batch.shape == (2, 3, 4, 5) and batch.dtype == np.float32 and batch.flags.c_contiguous
    np.testing.assert_allclose(batch, reference, rtol=1e-5, atol=1e-4)
    # Channel 0 of the tensor is blue: pixel B - 104.
    assert batch[1, 0, 2, 3] == pytest.approx((float(images[1][2, 3, 2]) - 104) / 2)


def test_scale_multiplies_the_pixels_before_the_mean() -> None:
    images = random_images(3)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = InputSpec(dtype="FP32", scale=1 / 255, mean=mean, std=std)
    batch = to_batch_tensor(images, spec)

    reference = (np.stack(images).astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(batch, reference, rtol=1e-5, atol=1e-5)


def test_scale_and_mean_do_not_touch_uint8() -> None:
    images = random_images(1)
    spec = InputSpec(dtype="UINT8", scale=1 / 255, mean=(1, 2, 3), std=(4, 5, 6))
    np.testing.assert_array_equal(to_batch_tensor(images, spec), np.stack(images))


# --- spec options: resize_px -----------------------------------------------------


def texture(height: int, width: int) -> np.ndarray:
    """Smooth, asymmetric waves: survives DCT-scaled decoding, shows a crop off by one pixel."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 128 + 100 * np.sin(2 * np.pi * x / 97)
    green = 128 + 100 * np.sin(2 * np.pi * y / 89)
    blue = 128 + 60 * np.sin(2 * np.pi * (x + 2 * y) / 151)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def reference_input(upright: Image.Image, spec: InputSpec) -> np.ndarray:
    """The spec's resize done the plain way on a full decode: resize the whole frame, slice the centre."""
    height, width = spec.height_px, spec.width_px
    if spec.resize == "stretch":
        if spec.resize_px is None:
            return np.asarray(upright.resize((width, height), Image.Resampling.BILINEAR))
        mid_w = mid_h = spec.resize_px
    else:
        assert spec.resize_px is not None
        short = min(upright.width, upright.height)
        mid_w = round(upright.width * spec.resize_px / short)
        mid_h = round(upright.height * spec.resize_px / short)
    resized = np.asarray(upright.resize((mid_w, mid_h), Image.Resampling.BILINEAR))
    top, left = (mid_h - height) // 2, (mid_w - width) // 2
    return resized[top : top + height, left : left + width]


def full_decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def assert_close(pixels: np.ndarray, reference: np.ndarray, *, mean_below: float, max_at_most: int) -> None:
    assert pixels.shape == reference.shape
    difference = np.abs(pixels.astype(np.int16) - reference.astype(np.int16))
    assert difference.mean() < mean_below, difference.mean()
    assert difference.max() <= max_at_most, difference.max()


@pytest.fixture(scope="module")
def big_texture() -> bytes:
    return encode_jpeg(texture(2000, 3000))


RESIZE_PX_SPECS = {
    "stretch 256 crop 224": InputSpec(resize="stretch", resize_px=256),
    "short side 256 crop 224": InputSpec(resize="center_crop", resize_px=256),
    "stretch 300 crop 200x256": InputSpec(resize="stretch", resize_px=300, height_px=200, width_px=256),
    "short side 240 crop 96x160": InputSpec(resize="center_crop", resize_px=240, height_px=96, width_px=160),
}


@pytest.mark.parametrize("spec", RESIZE_PX_SPECS.values(), ids=RESIZE_PX_SPECS.keys())
@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_resize_px_matches_a_full_decode_resized_then_cropped(
    big_texture: bytes, spec: InputSpec, portrait: bool
) -> None:
    data = encode_jpeg(texture(3000, 2000)) if portrait else big_texture
    pixels = decode_for_model(data, spec, what="image t", max_pixels=NO_LIMIT)
    assert_close(pixels, reference_input(full_decode(data), spec), mean_below=1.5, max_at_most=8)


@pytest.mark.parametrize("spec", RESIZE_PX_SPECS.values(), ids=RESIZE_PX_SPECS.keys())
def test_resize_px_geometry_is_exact_without_dct_scaling(
    photo: bytes, spec: InputSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the whole image decoded, one resize of the crop box equals resize-then-slice.
    real_decode = simplejpeg.decode_jpeg
    monkeypatch.setattr(imaging.simplejpeg, "decode_jpeg", lambda data, **kw: real_decode(data, colorspace="RGB"))
    pixels = decode_for_model(photo, spec, what="image c", max_pixels=NO_LIMIT)
    reference = reference_input(Image.fromarray(real_decode(photo, colorspace="RGB")), spec)
    assert_close(pixels, reference, mean_below=0.05, max_at_most=1)


def test_a_crop_off_by_one_pixel_would_be_caught(big_texture: bytes) -> None:
    """The texture is sharp enough that the tolerance above rejects a one-pixel shift."""
    spec = InputSpec(resize="stretch", resize_px=256)
    reference = reference_input(full_decode(big_texture), spec)
    shifted = np.asarray(full_decode(big_texture).resize((256, 256), Image.Resampling.BILINEAR))[17:241, 16:240]
    assert np.abs(shifted.astype(np.int16) - reference.astype(np.int16)).mean() > 10


def test_resize_px_must_leave_room_for_the_crop() -> None:
    with pytest.raises(ValidationError, match="resize_px"):
        InputSpec(resize_px=200)  # below 224
    with pytest.raises(ValidationError, match="resize_px"):
        InputSpec(height_px=100, width_px=300, resize_px=256)
    assert InputSpec(resize_px=224).resize_px == 224


@pytest.mark.parametrize(
    ("spec", "expected_min"),
    [
        (InputSpec(resize="stretch", resize_px=256), (256, 256)),
        (InputSpec(resize="center_crop", resize_px=256), (256, 384)),  # short side 2000 -> 256
        (InputSpec(resize="center_crop", resize_px=240, height_px=96, width_px=160), (240, 360)),
    ],
)
def test_resize_px_still_decodes_dct_scaled(
    big_texture: bytes, spec: InputSpec, expected_min: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = spy_on_decode(monkeypatch)
    decode_for_model(big_texture, spec, what="image t", max_pixels=NO_LIMIT)

    [(min_h, min_w, shape)] = seen
    assert (min_h, min_w) == expected_min
    # The smallest DCT scale (n/8) that covers it: far below 2000 x 3000, never below the cover.
    assert min_h <= shape[0] < 2000 // 2 and min_w <= shape[1] < 3000 // 2


def spy_on_decode(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, tuple[int, ...]]]:
    """Record (min_height, min_width, decoded shape) of every simplejpeg decode."""
    seen: list[tuple[int, int, tuple[int, ...]]] = []
    real_decode = simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        out = real_decode(*args, **kwargs)
        seen.append((kwargs.get("min_height", 0), kwargs.get("min_width", 0), out.shape))
        return out

    monkeypatch.setattr(imaging.simplejpeg, "decode_jpeg", spy)
    return seen


# --- EXIF orientation ----------------------------------------------------------------

# Orientation tag -> how a camera stores an upright scene: the inverse of the
# transpose that turns it upright (2, 3, 4, 5 and 7 are their own inverses).
STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def jpeg_with_orientation(upright: Image.Image, orientation: int, quality: int = 95) -> bytes:
    """A real JPEG whose pixels are stored turned, with the EXIF tag that turns them back."""
    transpose = STORED_AS[orientation]
    stored = upright if transpose is None else upright.transpose(transpose)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "Flotilla test camera"  # another IFD0 entry before/after the tag
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def upright_photo(photo: bytes) -> Image.Image:
    return full_decode(photo)  # 451 x 300 landscape: a quarter turn swaps its sides


ORIENTATION_SPECS = {
    "stretch": InputSpec(),
    "short side crop 96x160": InputSpec(resize="center_crop", resize_px=180, height_px=96, width_px=160),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_read_from_the_header(upright_photo: Image.Image, orientation: int) -> None:
    assert read_exif_orientation(jpeg_with_orientation(upright_photo, orientation)) == orientation


@pytest.mark.parametrize("spec", ORIENTATION_SPECS.values(), ids=ORIENTATION_SPECS.keys())
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_image_upright(
    upright_photo: Image.Image, orientation: int, spec: InputSpec
) -> None:
    data = jpeg_with_orientation(upright_photo, orientation)
    pixels = decode_for_model(data, spec, what="image o", max_pixels=NO_LIMIT)

    with Image.open(io.BytesIO(data)) as stored:
        reference_image = ImageOps.exif_transpose(stored).convert("RGB")
    assert reference_image.size == upright_photo.size  # the reference itself is upright
    reference = reference_input(reference_image, spec)
    assert_close(pixels, reference, mean_below=3.5, max_at_most=60)
    # ... and far from the stored, unturned pixels (the tolerance tells them apart).
    if orientation != 1:
        unturned = decode_for_model(data, spec.model_copy(update={"apply_exif_orientation": False}),
                                    what="image o", max_pixels=NO_LIMIT)
        assert np.abs(unturned.astype(np.int16) - reference.astype(np.int16)).mean() > 15


@pytest.mark.parametrize("orientation", [1, 6])
def test_the_buffer_a_photo_was_received_into_decodes_as_its_bytes(upright_photo: Image.Image, orientation: int) -> None:
    """The worker's S3 reader hands over the bytearray the body landed in (no copy to bytes)."""
    data = jpeg_with_orientation(upright_photo, orientation)
    received = bytearray(data)
    assert read_exif_orientation(received) == orientation
    for spec in ORIENTATION_SPECS.values():
        assert np.array_equal(
            decode_for_model(received, spec, what="image r", max_pixels=NO_LIMIT),
            decode_for_model(data, spec, what="image r", max_pixels=NO_LIMIT),
        )
    with pytest.raises(InvalidImage, match="not a JPEG"):
        decode_for_model(bytearray(b"GIF89a" + data[6:]), InputSpec(), what="image r", max_pixels=NO_LIMIT)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_off_keeps_the_stored_orientation(upright_photo: Image.Image, orientation: int) -> None:
    data = jpeg_with_orientation(upright_photo, orientation)
    spec = InputSpec(resize="center_crop", resize_px=180, height_px=96, width_px=160, apply_exif_orientation=False)
    pixels = decode_for_model(data, spec, what="image o", max_pixels=NO_LIMIT)
    assert_close(pixels, reference_input(full_decode(data), spec), mean_below=3.5, max_at_most=60)


@pytest.mark.parametrize(("orientation", "swapped"), [(1, False), (3, False), (5, True), (6, True), (8, True)])
def test_exif_orientation_decodes_once_dct_scaled_with_the_sides_swapped(
    orientation: int, swapped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    upright = Image.fromarray(texture(2000, 3000))
    data = jpeg_with_orientation(upright, orientation, quality=90)
    spec = InputSpec(resize="center_crop", resize_px=256)  # upright 2000 x 3000 -> cover 256 x 384
    seen = spy_on_decode(monkeypatch)
    pixels = decode_for_model(data, spec, what="image o", max_pixels=NO_LIMIT)

    [(min_h, min_w, shape)] = seen  # one decode, in the stored orientation
    assert (min_h, min_w) == ((384, 256) if swapped else (256, 384))
    assert shape[0] >= min_h and shape[1] >= min_w and shape[0] * shape[1] <= 3000 * 2000 // 16
    assert_close(pixels, reference_input(upright, spec), mean_below=2, max_at_most=20)


def exif_segment(tiff: bytes) -> bytes:
    payload = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload


def big_endian_tiff(orientation: int) -> bytes:
    entries = [
        (0x010F, 2, 4, b"Cam\x00"),  # Make, ASCII, fits in the value field
        (0x0112, 3, 1, orientation.to_bytes(2, "big") + b"\x00\x00"),
    ]
    body = b"MM" + (42).to_bytes(2, "big") + (8).to_bytes(4, "big") + len(entries).to_bytes(2, "big")
    for tag, kind, count, value in entries:
        body += tag.to_bytes(2, "big") + kind.to_bytes(2, "big") + count.to_bytes(4, "big") + value
    return body + (0).to_bytes(4, "big")


def test_big_endian_exif_after_a_jfif_segment_is_read(upright_photo: Image.Image) -> None:
    plain = encode_jpeg(np.asarray(upright_photo))
    assert plain[2:4] == b"\xff\xe0"  # Pillow writes JFIF APP0 first
    app0_end = 4 + int.from_bytes(plain[4:6], "big")
    data = plain[:app0_end] + exif_segment(big_endian_tiff(8)) + plain[app0_end:]
    assert read_exif_orientation(data) == 8
    assert decode_for_model(data, InputSpec(height_px=96, width_px=64), what="image m",
                            max_pixels=NO_LIMIT).shape == (96, 64, 3)


@pytest.mark.parametrize(
    "segment",
    [
        exif_segment(big_endian_tiff(9)),  # out of range
        exif_segment(big_endian_tiff(6)[:20]),  # IFD cut short
        exif_segment(b"XX\x00\x2a\x00\x00\x00\x08"),  # no byte order mark
        exif_segment(b"II\x2a\x00\xff\xff\xff\x7f"),  # IFD0 offset far outside the segment
        b"\xff\xe1\x00\x06Exif",  # segment shorter than the EXIF header
    ],
)
def test_broken_or_absent_exif_means_upright(photo: bytes, segment: bytes) -> None:
    data = photo[:2] + segment + photo[2:]
    assert read_exif_orientation(data) == 1
    assert read_exif_orientation(photo) == 1  # Pillow-written JPEG, no EXIF at all
    assert decode_for_model(data, InputSpec(), what="image b", max_pixels=NO_LIMIT).shape == (224, 224, 3)


# --- scores_to_probabilities ---------------------------------------------------------


def test_logits_become_a_softmax_per_row() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    probabilities = scores_to_probabilities(logits, "logits")
    exp = np.exp(logits.astype(np.float64))
    np.testing.assert_allclose(probabilities, exp / exp.sum(axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_softmax_is_stable_for_large_logits() -> None:
    probabilities = scores_to_probabilities(np.array([[1000.0, 1001.0, -1000.0]], dtype=np.float32), "logits")
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities[0], [1 / (1 + np.e), np.e / (1 + np.e), 0.0], rtol=1e-6, atol=1e-12)


def test_probabilities_pass_through_and_unknown_kinds_are_refused() -> None:
    scores = np.array([[0.2, 0.8]], dtype=np.float32)
    assert scores_to_probabilities(scores, "probabilities") is scores
    with pytest.raises(ValueError, match="unknown output kind"):
        scores_to_probabilities(scores, "sigmoid")
