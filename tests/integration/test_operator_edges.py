"""What an operator trips on, against the real stack: labels.txt put in a version directory, a
model without labels, an upper-case image uuid, and a load Triton refuses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc

from flotilla.cli import main
from flotilla.clients.client import FlotillaClient
from flotilla.clients.models import ModelsClient, upload_artifact
from flotilla.config import ModelSettings
from flotilla.errors import Code, FlotillaError
from flotilla.stack.local import LocalStack
from tests.integration.conftest import MODEL, MODEL_ONNX, sample, write_unloadable

LABELS = "".join(f"class-{i}\n" for i in range(1000))


@pytest.fixture
def models(stack: LocalStack) -> Iterator[ModelsClient]:
    with stack.models_client() as client:
        yield client


def effnet_dir(root: Path, *, labels_in: str | None) -> Path:
    """``root/1/model.onnx`` (the EfficientNet artifact) with labels.txt in ``labels_in`` (relative), if any."""
    (root / "1").mkdir(parents=True)
    (root / "1" / "model.onnx").symlink_to(MODEL_ONNX)
    if labels_in is not None:
        (root / labels_in).write_text(LABELS)
    return root


def deploy_unloaded(stack: LocalStack, models: ModelsClient, name: str) -> dict[str, object]:
    """Deploy ``name`` from s3://flotilla-models/NAME with no copy (nothing loads); its registered spec."""
    spec = stack.base.models[MODEL].model_copy(
        update={"artifact": None, "storage_uri": f"s3://flotilla-models/{name}", "min_copies": 0, "max_copies": 1}
    )
    status = models.deploy(name, spec)
    return json.loads(status.spec_json)  # type: ignore[no-any-return]


def test_labels_put_in_the_version_directory_are_uploaded_and_served(
    stack: LocalStack, models: ModelsClient, tmp_path: Path
) -> None:
    assert stack.settings is not None
    local = effnet_dir(tmp_path / "versioned-labels", labels_in="1/labels.txt")
    files = upload_artifact(stack.settings.s3, local, "s3://flotilla-models/versioned-labels")
    assert "labels.txt" in files
    try:
        registered = deploy_unloaded(stack, models, "versioned-labels")
        assert registered["labels"] == LABELS.splitlines()
        assert "no_labels" not in [e.kind for e in models.status("versioned-labels").events]
    finally:
        models.undeploy("versioned-labels")


def test_a_model_without_labels_is_warned_about_at_upload_and_at_deploy(
    stack: LocalStack, models: ModelsClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = effnet_dir(tmp_path / "unlabelled", labels_in=None)
    main(["models", "--state", str(stack.run_dir / "stack.json"), "upload", "unlabelled", str(local)])
    uploaded = capsys.readouterr()
    assert "uploaded 1 file(s) to s3://flotilla-models/unlabelled" in uploaded.out
    assert f"warning: {local} has no labels.txt: the model's classes will be shown as numbers" in uploaded.err
    try:
        registered = deploy_unloaded(stack, models, "unlabelled")
        assert registered["labels"] == []
        events = {e.kind: e.message for e in models.status("unlabelled").events}
        assert "no labels.txt at s3://flotilla-models/unlabelled" in events["no_labels"]
        assert "classes are shown as their numbers" in events["no_labels"]
    finally:
        models.undeploy("unlabelled")


async def test_an_upper_case_uuid_finds_the_image_uploaded_in_lower_case(client: FlotillaClient) -> None:
    image_uuid = await client.upload(sample("chelsea.jpg"))
    assert image_uuid == image_uuid.lower()
    result = await client.classify(image_uuid.upper(), MODEL)
    assert result.classes[0].label == "Egyptian cat"
    # An upload under an upper-case uuid is stored under the canonical one.
    assert await client.upload(sample("chelsea.jpg"), image_uuid.upper()) == image_uuid


def repository_index(address: str) -> dict[str, dict[str, str]]:
    """Triton's own repository index of a replica: model name -> its entry (state, reason)."""
    client = triton_grpc.InferenceServerClient(address)
    try:
        return {e["name"]: e for e in client.get_model_repository_index(as_json=True).get("models", [])}
    finally:
        client.close()


def test_a_failed_load_leaves_no_entry_in_the_replica_repository_index(
    stack: LocalStack, models: ModelsClient, tmp_path: Path
) -> None:
    assert stack.settings is not None
    upload_artifact(stack.settings.s3, write_unloadable(tmp_path / "unloadable"), "s3://flotilla-models/unloadable")
    spec = ModelSettings(storage_uri="s3://flotilla-models/unloadable", memory_mb=50, labels=LABELS.splitlines())

    with pytest.raises(FlotillaError) as caught:
        models.deploy("unloadable", spec)

    assert caught.value.code == Code.FAILED_PRECONDITION and "could not load" in caught.value.message
    tried = [p.address for p in stack.tritons if p.address in caught.value.message]
    assert tried, caught.value.message  # the message names the replica that refused it
    for proc in stack.tritons:
        index = repository_index(proc.address)
        assert "unloadable" not in index, index["unloadable"]
        assert index[MODEL]["state"] == "READY"  # the replica's other model is untouched
