"""The Ray Serve peer's pure parts: one replica's batch with fakes, the figures, the README lines.

Nothing here needs Ray (the ``peer`` extra) or a stack.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from flotilla.bench.peer_app import PeerConfig, PeerModel, model_input, ray_available
from flotilla.bench.peer_run import CONCURRENCY, MESH_QUEUE_DELAY_S, mean_batch, peer_lines, ray_tiers
from flotilla.common.ids import new_image_uuid, object_key
from flotilla.config import S3Settings
from flotilla.errors import ImageNotFound

CLASSES = 10


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


class FakeStore:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.keys: list[str] = []

    def get(self, key: str, max_bytes: int) -> bytes:
        self.keys.append(key)
        if key not in self.objects:
            raise ImageNotFound(f"no object {key!r}")
        return self.objects[key]


class FakeSession:
    """Scores each image by its mean red value: class = red // 26, one call per batch."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        (batch,) = feeds.values()
        self.batches.append(batch.shape)
        scores = np.full((len(batch), CLASSES), 0.01, dtype=np.float32)
        for row, image in enumerate(batch):
            scores[row, min(CLASSES - 1, int(image[..., 0].mean()) // 26)] = 0.9
        return [scores]


def model(objects: dict[str, bytes]) -> tuple[PeerModel, FakeStore, FakeSession]:
    store, session = FakeStore(objects), FakeSession()
    config = PeerConfig(onnx_file="unused.onnx", s3=S3Settings(), fetch_threads=2)
    return PeerModel(config, store=store, session=session), store, session


def test_a_batch_is_fetched_by_key_decoded_to_the_model_input_and_run_once() -> None:
    red, blue = new_image_uuid(), new_image_uuid()
    peer, store, session = model({object_key(red): jpeg((250, 0, 0)), object_key(blue): jpeg((0, 0, 250))})

    answers = asyncio.run(peer.run_batch([red, blue, red]))

    assert sorted(store.keys) == sorted([f"{red}.jpg", f"{blue}.jpg", f"{red}.jpg"])
    spec = model_input()
    assert session.batches == [(3, spec.height_px, spec.width_px, 3)]  # NHWC uint8, one call
    assert [a["classes"][0][0] for a in answers] == [9, 0, 9]
    assert all(len(a["classes"]) == 5 and a["batch"] == 3 for a in answers)
    index, label, score = answers[0]["classes"][0]
    assert (label, score) == ("9", pytest.approx(0.9))  # no labels file: the index


def test_a_missing_image_fails_only_its_own_item() -> None:
    good, missing = new_image_uuid(), new_image_uuid()
    peer, _, session = model({object_key(good): jpeg((120, 0, 0))})

    answers = asyncio.run(peer.run_batch([missing, good]))

    assert "no object" in answers[0]["error"] and "classes" not in answers[0]
    assert answers[1]["classes"][0][0] == 4
    assert session.batches[0][0] == 1  # only the good image reached the model
    assert [a["batch"] for a in answers] == [2, 2]


def test_labels_come_from_the_labels_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(CLASSES)) + "\n")
    image = new_image_uuid()
    config = PeerConfig(onnx_file="unused.onnx", s3=S3Settings(), labels_file=str(labels))
    peer = PeerModel(config, store=FakeStore({object_key(image): jpeg((0, 0, 0))}), session=FakeSession())

    (answer,) = asyncio.run(peer.run_batch([image]))

    assert answer["classes"][0][:2] == [0, "class 0"]


def test_mean_batch_is_images_per_batch_from_the_answers() -> None:
    # Two batches of 8 and one of 2: 18 answers, 3 batches.
    assert mean_batch([8] * 16 + [2] * 2) == pytest.approx(6.0)
    assert mean_batch([1, 1, 1]) == pytest.approx(1.0)
    assert np.isnan(mean_batch([]))


def test_the_peer_runs_at_the_mesh_cpu_bench_point() -> None:
    assert CONCURRENCY == 64
    assert MESH_QUEUE_DELAY_S == pytest.approx(0.002)


def test_peer_lines_give_the_ratio_flotilla_over_ray() -> None:
    result = {
        "ray_version": "2.60.0", "ray_mode": "defaults", "front_door": "http", "replicas": 2, "max_batch_size": 8,
        "batch_wait_timeout_s": 0.002, "concurrency": 64, "duration_s": 15.0, "warmup_s": 2.0,
        "images_per_s": 50.0, "p99_ms": 2000.0, "mean_batch": 2.5, "errors": 0, "intra_op_threads": 1,
        "photos": "large photos",
    }

    lines = peer_lines(result, flotilla_img_s=125.0, flotilla_p99_ms=500.0)

    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| | Flotilla | Ray Serve | Flotilla / Ray |"
    assert table[2] == "| images/s | 125.0 | 50.0 | **2.5x** |"
    assert table[3] == "| p99 latency (ms) | 500.0 | 2000.0 | 0.25x |"
    assert "| 2.5 |" in table[4]
    assert not any("CPU-ms" in line for line in table)  # no mesh CPU given
    assert "HTTP proxy" in lines[0] and "max_batch_size=8" in lines[0] and "concurrency 64" in lines[0]


def test_peer_lines_compare_cpu_per_image_when_both_are_known() -> None:
    result = {
        "replicas": 2, "max_batch_size": 8, "batch_wait_timeout_s": 0.002, "concurrency": 64, "duration_s": 15.0,
        "images_per_s": 50.0, "p99_ms": 2000.0, "front_door": "handle", "cpu_us_per_image": {"total": 26000.0},
    }

    lines = peer_lines(result, 125.0, 500.0, flotilla_cpu_us_per_image=13000.0)

    assert "| CPU-ms per image, every process (load generator included) | 13.0 | 26.0 | 0.5x |" in lines
    assert "DeploymentHandle" in lines[0]


def test_ray_tiers_count_this_process_as_the_load_generator() -> None:
    tiers = ray_tiers(set())
    assert set(tiers) == {"replicas", "http proxy", "serve controller", "ray system", "load generator"}
    assert not tiers["load generator"].descendants


def test_ray_available_answers_without_raising() -> None:
    assert isinstance(ray_available(), bool)
