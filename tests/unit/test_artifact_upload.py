"""`flotilla models upload`: where labels.txt is taken from, and the warning when there is none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flotilla.clients.models import missing_labels
from flotilla.errors import InvalidArgument
from flotilla.services.controller.artifacts import ArtifactStore

LABELS = b"cat\ndog\n"


class RecordingStore:
    """What ArtifactStore.upload writes, by key (stands in for the bucket's ObjectStore)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def ensure_bucket(self) -> None:
        pass

    def put(self, key: str, data: bytes, content_type: str = "") -> None:
        self.objects[key] = data


def model_dir(root: Path, versions: dict[str, bytes | None], beside: bytes | None = None) -> Path:
    """``root/<v>/model.onnx`` for each version, with ``<v>/labels.txt`` where given and ``labels.txt`` beside."""
    for version, labels in versions.items():
        (root / version).mkdir(parents=True)
        (root / version / "model.onnx").write_bytes(b"onnx " + version.encode())
        if labels is not None:
            (root / version / "labels.txt").write_bytes(labels)
    if beside is not None:
        (root / "labels.txt").write_bytes(beside)
    return root


def upload(local_dir: Path) -> tuple[RecordingStore, dict[str, dict[str, object]]]:
    store = RecordingStore()
    files = ArtifactStore(lambda bucket: store).upload(local_dir, "s3://models/m")  # type: ignore[arg-type, return-value]
    return store, files


def test_labels_beside_the_versions_are_uploaded(tmp_path: Path) -> None:
    store, files = upload(model_dir(tmp_path / "m", {"1": None}, beside=LABELS))
    assert store.objects["m/labels.txt"] == LABELS and "labels.txt" in files
    assert missing_labels(tmp_path / "m", files) is None


def test_labels_put_in_the_version_directory_are_taken_not_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, files = upload(model_dir(tmp_path / "m", {"1": LABELS, "2": LABELS}))
    assert store.objects["m/labels.txt"] == LABELS
    assert "labels.txt" in json.loads(store.objects["m/manifest.json"])["files"]
    assert "labels.txt belongs beside the version directories" in caplog.text


@pytest.mark.parametrize(
    ("versions", "beside"),
    [({"1": LABELS, "2": b"other\n"}, None), ({"1": b"other\n"}, LABELS)],
    ids=["versions-disagree", "version-disagrees-with-beside"],
)
def test_labels_that_disagree_are_rejected_saying_where_they_belong(
    tmp_path: Path, versions: dict[str, bytes | None], beside: bytes | None
) -> None:
    local = model_dir(tmp_path / "m", versions, beside)
    store = RecordingStore()
    with pytest.raises(InvalidArgument) as info:
        ArtifactStore(lambda bucket: store).upload(local, "s3://models/m")  # type: ignore[arg-type, return-value]
    assert f"beside its version directories ({local / 'labels.txt'})" in info.value.message
    assert store.objects == {}  # rejected before anything is written


def test_an_upload_without_labels_gets_a_warning(tmp_path: Path) -> None:
    local = model_dir(tmp_path / "m", {"1": None})
    _, files = upload(local)
    warning = missing_labels(local, files)
    assert warning is not None
    assert "no labels.txt" in warning and "shown as numbers" in warning and str(local / "labels.txt") in warning
