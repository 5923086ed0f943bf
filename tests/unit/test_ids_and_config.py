"""Image uuid checks and settings loading."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from flotilla.common.ids import check_image_uuid, new_image_uuid, object_key
from flotilla.config import FlotillaSettings, dump_settings, load_settings
from flotilla.errors import Code, InvalidImageUuid

# --- ids ----------------------------------------------------------------------


def test_valid_uuid4_is_returned_unchanged() -> None:
    value = str(uuid.uuid4())
    assert check_image_uuid(value) == value


def test_an_upper_case_uuid_is_canonicalised_to_lower_case_and_so_is_its_key() -> None:
    """Upper- and lower-case hex name one UUID, and the image was stored under lower case."""
    value = str(uuid.uuid4())
    assert check_image_uuid(value.upper()) == value
    assert check_image_uuid(value[:9] + value[9:].upper()) == value
    assert object_key(value.upper()) == object_key(value) == f"{value}.jpg"


def test_new_image_uuid_passes_the_check() -> None:
    assert check_image_uuid(new_image_uuid())


def test_empty_uuid_is_rejected() -> None:
    with pytest.raises(InvalidImageUuid, match="empty") as info:
        check_image_uuid("")
    assert info.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "value",
    [
        "../x",
        "a/b",
        "/etc/passwd",
        "../../../../../../../../../../../../../../../etc/passwd",  # 55 chars
        "123e4567-e89b-12d3-a456-42661417400/",  # 36 chars, one slash
        "123e4567/e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-42661417400g",
        "123e4567e89b12d3a456426614174000",  # hex form without dashes
        "{123e4567-e89b-12d3-a456-426614174000}",
        " 123e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-426614174000\n",
    ],
)
def test_non_canonical_or_path_like_uuid_is_rejected(value: str) -> None:
    with pytest.raises(InvalidImageUuid, match="not a canonical UUID"):
        check_image_uuid(value)


@pytest.mark.parametrize("filler", ["a", "/", "\x00"])
def test_error_for_a_10kb_uuid_is_short(filler: str) -> None:
    with pytest.raises(InvalidImageUuid) as info:
        check_image_uuid(filler * 10_240)
    assert len(info.value.message) < 300
    assert "10240 chars" in info.value.message


def test_object_key_is_uuid_dot_jpg_and_checks_the_uuid() -> None:
    value = str(uuid.uuid4())
    assert object_key(value) == f"{value}.jpg"
    with pytest.raises(InvalidImageUuid):
        object_key("../secret")


# --- config -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FLOTILLA_* variable from the shell running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("FLOTILLA_"):
            monkeypatch.delenv(name)


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flotilla.yaml"
    path.write_text(text, encoding="utf-8")
    return path


CONFIG = """\
host: 0.0.0.0
triton:
  replicas: 4
  startup_timeout_s: 7
router:
  api_keys: [abc]
models:
  resnet50:
    backend_model: resnet50_onnx
    input: {layout: NCHW, dtype: FP32, mean: [1, 2, 3], std: [4, 5, 6]}
    batching: {max_batch_size: 16, max_queue_delay_us: 500}
"""


def test_yaml_values_are_loaded(tmp_path: Path) -> None:
    settings = load_settings(write_yaml(tmp_path, CONFIG))

    assert settings.host == "0.0.0.0"
    assert settings.triton.replicas == 4
    assert settings.triton.startup_timeout_s == 7.0
    assert [k.get_secret_value() for k in settings.router.api_keys] == ["abc"]
    assert list(settings.models) == ["resnet50"]
    resnet = settings.model("resnet50")
    assert resnet.backend_model == "resnet50_onnx"
    assert (resnet.input.layout, resnet.input.dtype, resnet.input.mean) == ("NCHW", "FP32", (1.0, 2.0, 3.0))
    assert (resnet.batching.max_batch_size, resnet.batching.max_queue_delay_us) == (16, 500)
    assert resnet.batching.max_inflight_batches == 2  # default kept


def test_defaults_without_a_file() -> None:
    settings = load_settings()
    assert settings.triton.replicas == 2
    assert settings.models == {}, "models are deployed through the registry; none by default"


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write_yaml(tmp_path, "")).triton.replicas == 2


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mapping"):
        load_settings(write_yaml(tmp_path, "- a\n- b\n"))


def test_environment_overrides_the_yaml_and_keeps_its_siblings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOTILLA_TRITON__REPLICAS", "9")

    settings = load_settings(write_yaml(tmp_path, CONFIG))

    assert settings.triton.replicas == 9
    assert settings.triton.startup_timeout_s == 7.0


def test_environment_overrides_keyword_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOTILLA_HOST", "10.0.0.1")
    assert load_settings(host="192.168.0.1").host == "10.0.0.1"


def test_zero_max_batch_size_is_rejected_naming_the_field(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "models:\n  m:\n    batching:\n      max_batch_size: 0\n")

    with pytest.raises(ValidationError) as info:
        load_settings(path)

    assert "max_batch_size" in str(info.value)
    assert [error["loc"] for error in info.value.errors()] == [("models", "m", "batching", "max_batch_size")]


def test_invalid_environment_value_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOTILLA_TRITON__REPLICAS", "0")
    with pytest.raises(ValidationError, match="replicas"):
        load_settings()


@pytest.mark.parametrize(
    "text, field",
    [
        ("colour: blue\n", "colour"),
        ("triton:\n  replica: 3\n", "replica"),
        ("models:\n  m:\n    batching:\n      max_batch: 3\n", "max_batch"),
    ],
)
def test_unknown_keys_are_rejected(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ValidationError, match=field) as info:
        load_settings(write_yaml(tmp_path, text))
    assert info.value.errors()[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize(
    ("model", "problem"),
    [
        ("{min_copies: 3, max_copies: 2}", "min_copies \\(3\\) is above max_copies \\(2\\)"),
        ("{versions: [1, 2], default_version: 3}", "default_version 3 is not one of versions"),
        ("{versions: []}", "must list positive version numbers"),
        ("{batching: {max_batch_size: 128}}", "above backend.max_batch_size \\(64\\)"),
        ("{memory_mb: 0}", "memory_mb"),
    ],
)
def test_inconsistent_model_specs_are_rejected_naming_the_fields(tmp_path: Path, model: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        load_settings(write_yaml(tmp_path, f"models:\n  m: {model}\n"))


def test_a_model_spec_orders_its_versions_and_serves_the_highest_by_default(tmp_path: Path) -> None:
    settings = load_settings(write_yaml(tmp_path, "models:\n  m: {versions: [3, 1]}\n"))
    assert settings.models["m"].versions == [1, 3]
    assert settings.models["m"].served_version == 3


def test_dump_then_load_round_trips_secrets(tmp_path: Path) -> None:
    settings = load_settings(write_yaml(tmp_path, CONFIG))
    dumped = tmp_path / "dumped.yaml"

    dump_settings(settings, dumped)
    again = load_settings(dumped)

    assert again == settings
    assert again.s3.secret_key.get_secret_value() == "flotilla-dev-secret"
    assert [k.get_secret_value() for k in again.router.api_keys] == ["abc"]
    assert isinstance(again, FlotillaSettings)


# --- memory sizes (flotilla models deploy --memory) --------------------------


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("300", 300.0),
        ("300Mi", 300.0),
        ("300MiB", 300.0),
        ("1.5Gi", 1536.0),
        ("1GiB", 1024.0),
        ("512Ki", 0.5),
        ("512KiB", 0.5),
        ("300M", 300e6 / 2**20),
        ("300MB", 300e6 / 2**20),
        ("1G", 1e9 / 2**20),
        ("1GB", 1e9 / 2**20),
        ("2000kB", 2e6 / 2**20),
        (" 300 Mi ", 300.0),
    ],
)
def test_memory_sizes_take_binary_and_decimal_units(text: str, mib: float) -> None:
    from flotilla.cli import parse_memory_mb

    assert parse_memory_mb(text) == pytest.approx(mib)


@pytest.mark.parametrize("text", ["300XB", "300mb", "300 megabytes", "-1Mi", "Mi", ""])
def test_a_memory_size_in_an_unknown_unit_fails_naming_the_accepted_units(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from flotilla.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["models", "--controller", "127.0.0.1:1", "deploy", "m", f"--memory={text}"])
    assert exited.value.code == 2  # argparse's usage error, before anything is called
    message = capsys.readouterr().err
    assert f"argument --memory: {text!r} is not a memory size" in message
    for unit in ("Mi", "MiB", "Gi", "GiB", "M", "MB", "G", "GB", "bare number of MiB"):
        assert unit in message

