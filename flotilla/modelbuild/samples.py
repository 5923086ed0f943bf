"""Write scikit-image's real photographs as JPEG files for demos and tests.

    python -m flotilla.modelbuild.samples --out build/samples

Also ``<out>/documents/page-{upright,rot90,rot180,rot270}.jpg``: scikit-image's
scanned text page, turned clockwise by that many degrees (the pixels are
turned; no EXIF orientation), for the document-orientation model.

Runs in the build virtualenv (scikit-image is not a runtime dependency). The
photos ship inside the scikit-image wheel; they are re-encoded as JPEG
because that is what clients upload.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from PIL import Image

# name in skimage/data -> what a sensible ImageNet classifier should see
PHOTOS = {
    "chelsea.png": "a tabby cat",
    "coffee.png": "a cup of espresso",
    "astronaut.png": "an astronaut portrait",
    "rocket.jpg": "a rocket on its launch pad",
    "motorcycle_left.png": "a motorcycle",
}
JPEG_QUALITY = 90
# Preprocessing benchmarks need 1-2 MP photos: retina.jpg is one (1411x1411);
# the others are upscaled to about 1.5 MP (Lanczos) so their JPEGs carry
# camera-sized pixel counts.
LARGE_PHOTOS = ["retina.jpg", "chelsea.png", "coffee.png", "astronaut.png", "motorcycle_left.png", "rocket.jpg"]
LARGE_TARGET_PIXELS = 1_500_000
# A scanned page of text; written upright and turned clockwise by 90, 180 and 270 degrees.
DOCUMENT = "page.png"
DOCUMENT_ROTATIONS_DEG = (0, 90, 180, 270)


def skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise SystemExit("scikit-image is not installed in this environment")
    return Path(spec.origin).parent / "data"


def write_samples(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = skimage_data_dir()
    written = []
    for name in PHOTOS:
        target = out / (Path(name).stem + ".jpg")
        with Image.open(data / name) as photo:
            photo.convert("RGB").save(target, "JPEG", quality=JPEG_QUALITY)
        written.append(target)
    return written


def write_large_samples(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = skimage_data_dir()
    written = []
    for name in LARGE_PHOTOS:
        with Image.open(data / name) as photo:
            rgb = photo.convert("RGB")
        if rgb.width * rgb.height < 1_000_000:
            scale = (LARGE_TARGET_PIXELS / (rgb.width * rgb.height)) ** 0.5
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
        target = out / (Path(name).stem + ".jpg")
        rgb.save(target, "JPEG", quality=JPEG_QUALITY)
        written.append(target)
    return written


def document_name(clockwise_deg: int) -> str:
    return "page-upright.jpg" if clockwise_deg == 0 else f"page-rot{clockwise_deg}.jpg"


def write_document_samples(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with Image.open(skimage_data_dir() / DOCUMENT) as page:
        upright = page.convert("RGB")
    written = []
    for degrees in DOCUMENT_ROTATIONS_DEG:
        target = out / document_name(degrees)
        # PIL rotates counter-clockwise for positive angles; expand keeps the whole page.
        upright.rotate(-degrees, expand=True).save(target, "JPEG", quality=JPEG_QUALITY)
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    documents = write_document_samples(args.out / "documents")
    for path in [*write_samples(args.out), *write_large_samples(args.out / "large"), *documents]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
