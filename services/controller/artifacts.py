"""Model artifacts in the object store, and a replica-side cache of them.

A storage URI ``s3://BUCKET/PREFIX`` holds one model's artifact:

    PREFIX/<version>/model.onnx     one directory per version
    PREFIX/labels.txt               optional: one class name per line
    PREFIX/manifest.json            {"files": {"1/model.onnx": {"sha256": ..., "bytes": ...}, ...}}

``flotilla models upload`` writes all of them; the manifest is what makes a
download verifiable. The cache keeps each downloaded file under its
checksum (``<root>/<model>/<version>/<sha256>/model.onnx``): a file is
written to a temporary name, verified, then renamed, so a present file is a
verified one and is reused by every later load of the same bytes.

A deploy also reads each version's graph (``ArtifactStore.graph``: its
declared inputs and outputs, kept per checksum) to check the spec against it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flotilla.common.object_store import ObjectStore
from flotilla.errors import ArtifactUnavailable, FlotillaError, ImageNotFound, InvalidArgument
from flotilla.services.controller.graph import ModelGraph, read_graph

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
MANIFEST_FILE = "manifest.json"
MAX_ARTIFACT_BYTES = 2 * 1024**3
MAX_SMALL_FILE_BYTES = 16 * 1024 * 1024
MAX_GRAPHS = 64
"""Graphs (inputs and outputs only: a few hundred bytes each) kept by checksum, so a redeploy reads none again."""


@dataclass(frozen=True)
class StorageUri:
    bucket: str
    prefix: str
    """Key prefix without a trailing slash (may be empty)."""

    @classmethod
    def parse(cls, uri: str) -> StorageUri:
        if not uri.startswith("s3://"):
            raise InvalidArgument(f"storage URI {uri!r} must look like s3://bucket/prefix")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise InvalidArgument(f"storage URI {uri!r} names no bucket; use s3://bucket/prefix")
        return cls(bucket, prefix.strip("/"))

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_labels(local_dir: Path, versions: list[Path]) -> Path | None:
    """The labels.txt an upload of ``local_dir`` takes: ``local_dir/labels.txt``, else one put in
    the version directories (the same file in each that has one); None when there is none.

    A model has one list of class names, stored beside its versions. Version
    directories whose labels.txt differ (from each other or from the one beside
    them) are rejected, saying where the file belongs, rather than one of them
    being picked or all skipped.
    """
    beside = local_dir / LABELS_FILE
    inside = [v / LABELS_FILE for v in versions if (v / LABELS_FILE).is_file()]
    if not inside:
        return beside if beside.is_file() else None
    reference = beside if beside.is_file() else inside[0]
    differing = [p for p in inside if p.read_bytes() != reference.read_bytes()]
    if differing:
        raise InvalidArgument(
            f"{differing[0]} differs from {reference}: a model has one labels.txt, beside its version "
            f"directories ({beside}); put the right one there and remove those in the version directories"
        )
    if reference is not beside:
        log.warning("%s: labels.txt belongs beside the version directories (%s); uploading it as the "
                    "model's labels", reference, beside)
    return reference


class ArtifactStore:
    """Reads and writes artifacts through ObjectStores, one per bucket."""

    def __init__(self, store_for_bucket: Callable[[str], ObjectStore]) -> None:
        self._store_for_bucket = store_for_bucket
        self._stores: dict[str, ObjectStore] = {}
        self._graphs: dict[str, ModelGraph] = {}

    def _store(self, bucket: str) -> ObjectStore:
        if bucket not in self._stores:
            self._stores[bucket] = self._store_for_bucket(bucket)
        return self._stores[bucket]

    def upload(self, local_dir: Path, uri: str) -> dict[str, dict[str, object]]:
        """Put ``local_dir`` (``<version>/model.onnx``, optional labels.txt) at ``uri`` with a manifest."""
        where = StorageUri.parse(uri)
        if not local_dir.is_dir():
            raise InvalidArgument(f"{local_dir} is not a directory")
        files: dict[str, dict[str, object]] = {}
        versions = sorted(p for p in local_dir.iterdir() if p.is_dir() and p.name.isdigit())
        if not versions:
            raise InvalidArgument(f"{local_dir} has no version directory (expected {local_dir}/1/{MODEL_FILE})")
        labels = local_labels(local_dir, versions)
        store = self._store(where.bucket)
        store.ensure_bucket()
        for version in versions:
            path = version / MODEL_FILE
            if not path.is_file():
                raise InvalidArgument(f"{path} is missing")
            data = path.read_bytes()
            store.put(where.key(f"{version.name}/{MODEL_FILE}"), data, content_type="application/octet-stream")
            files[f"{version.name}/{MODEL_FILE}"] = {"sha256": _sha256(data), "bytes": len(data)}
        if labels is not None:
            data = labels.read_bytes()
            store.put(where.key(LABELS_FILE), data, content_type="text/plain")
            files[LABELS_FILE] = {"sha256": _sha256(data), "bytes": len(data)}
        manifest = {"files": files}
        store.put(where.key(MANIFEST_FILE), json.dumps(manifest, indent=2).encode(), content_type="application/json")
        return files

    def manifest(self, uri: str) -> dict[str, dict[str, object]]:
        where = StorageUri.parse(uri)
        try:
            raw = self._store(where.bucket).get(where.key(MANIFEST_FILE), MAX_SMALL_FILE_BYTES)
        except ImageNotFound as exc:
            raise ArtifactUnavailable(
                f"no artifact at {where}: {where.key(MANIFEST_FILE)!r} is missing "
                f"(upload it with `flotilla models upload NAME DIR --storage-uri {where}`)"
            ) from exc
        except FlotillaError as exc:
            raise ArtifactUnavailable(f"artifact at {where} cannot be read: {exc.message}") from exc
        try:
            files = json.loads(raw)["files"]
            assert isinstance(files, dict)
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise ArtifactUnavailable(f"artifact at {where} has an unreadable {MANIFEST_FILE}: {exc}") from exc
        return files

    def check(self, uri: str, versions: list[int]) -> dict[str, dict[str, object]]:
        """The manifest, once every version's model file is listed and stored at its size."""
        where = StorageUri.parse(uri)
        files = self.manifest(uri)
        store = self._store(where.bucket)
        for version in versions:
            relative = f"{version}/{MODEL_FILE}"
            entry = files.get(relative)
            if entry is None:
                listed = ", ".join(sorted(files)) or "nothing"
                raise ArtifactUnavailable(
                    f"artifact at {where} has no version {version} ({relative}); it lists {listed}"
                )
            try:
                size = store.size(where.key(relative))
            except FlotillaError as exc:
                raise ArtifactUnavailable(f"artifact at {where} cannot be read: {exc.message}") from exc
            if size != entry.get("bytes"):
                raise ArtifactUnavailable(
                    f"artifact at {where}: {relative} is {size} bytes, its manifest says {entry.get('bytes')}"
                )
        return files

    def labels(self, uri: str, manifest: dict[str, dict[str, object]]) -> list[str]:
        if LABELS_FILE not in manifest:
            return []
        where = StorageUri.parse(uri)
        data = self._store(where.bucket).get(where.key(LABELS_FILE), MAX_SMALL_FILE_BYTES)
        return data.decode("utf-8").splitlines()

    def graph(self, uri: str, version: int, manifest: dict[str, dict[str, object]]) -> ModelGraph:
        """The inputs and outputs ``<version>/model.onnx`` declares (blocking: downloads and parses it
        unless a file of the same checksum was read before)."""
        relative = f"{version}/{MODEL_FILE}"
        digest = str(manifest.get(relative, {}).get("sha256", ""))
        known = self._graphs.get(digest)
        if known is not None:
            return known
        data = self.read(uri, relative)
        if digest and _sha256(data) != digest:
            raise ArtifactUnavailable(
                f"{relative} from {uri} fails its checksum (expected sha256 {digest[:12]}..., got "
                f"{_sha256(data)[:12]}...); upload it again with `flotilla models upload`"
            )
        graph = read_graph(data, f"{StorageUri.parse(uri)}/{relative}")
        if digest:
            while len(self._graphs) >= MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[digest] = graph
        return graph

    def read(self, uri: str, relative: str, max_bytes: int = MAX_ARTIFACT_BYTES) -> bytes:
        where = StorageUri.parse(uri)
        try:
            return self._store(where.bucket).get(where.key(relative), max_bytes)
        except FlotillaError as exc:
            raise ArtifactUnavailable(f"cannot download {relative} from {where}: {exc.message}") from exc


class ArtifactCache:
    """Verified local copies of model files, reused across loads."""

    def __init__(self, root: Path, artifacts: ArtifactStore) -> None:
        self.root = root
        self.artifacts = artifacts
        self.hits = 0
        self.downloads = 0

    def fetch(self, model: str, uri: str, version: int, manifest: dict[str, dict[str, object]]) -> Path:
        """The local path of ``<version>/model.onnx``, downloading and verifying it when not cached."""
        relative = f"{version}/{MODEL_FILE}"
        entry = manifest.get(relative)
        if entry is None:
            raise ArtifactUnavailable(f"artifact at {uri} has no version {version}")
        digest = str(entry["sha256"])
        path = self.root / model / str(version) / digest / MODEL_FILE
        if path.is_file() and path.stat().st_size == entry.get("bytes"):
            self.hits += 1
            return path
        data = self.artifacts.read(uri, relative)
        if _sha256(data) != digest:
            raise ArtifactUnavailable(
                f"{relative} from {uri} fails its checksum (expected sha256 {digest[:12]}..., got {_sha256(data)[:12]}...)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        self.downloads += 1
        log.info("cached %s version %d (%d bytes) at %s", model, version, len(data), path)
        return path
