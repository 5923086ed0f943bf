"""JPEG decoding, resizing, batching and top-k for the preprocess worker."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from flotilla.config import InputSpec
from flotilla.errors import Code, ImageTooLarge, InvalidImage
from flotilla.services.preprocess import imaging
from flotilla.services.preprocess.imaging import decode_for_model, read_jpeg_size, to_batch_tensor, top_k

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
