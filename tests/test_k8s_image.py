"""The Dockerfile the manifests run: pinned base, non-root, flotilla as the entry point, the default target last."""

from __future__ import annotations

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    result: dict[str, list[str]] = {}
    current = ""
    for line in lines:
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(2)
            result[current] = [line]
        elif current:
            result[current].append(line)
    return result


def test_the_base_is_pinned_to_a_patch_release() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", text)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1)), base


def test_every_target_runs_as_a_non_root_user_and_flotilla_is_the_default() -> None:
    found = stages()
    assert list(found)[-1] == "flotilla", "the last stage is what `docker build .` produces"
    for name in ("runtime", "triton-cpu"):
        users = [line for line in found[name] if line.startswith("USER ")]
        assert users and users[-1] == "USER 65532:65532", name
    assert 'ENTRYPOINT ["flotilla"]' in found["runtime"]
    # Nothing but the installed wheels reaches the runtime image.
    assert not any(line.startswith(("COPY ", "ADD ")) for line in found["runtime"])


def test_the_image_installs_runtime_dependencies_only() -> None:
    """Load-test, plotting and model-build packages live in extras the image does not install."""
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    for heavy in ("tqdm", "matplotlib", "onnxruntime", "torch", "pytest"):
        assert heavy not in runtime, f"{heavy} belongs in an extra, not in the image"
    assert set(project["optional-dependencies"]) >= {"local", "test", "loadtest", "triton"}


def test_the_services_run_in_flotillas_environment_and_triton_in_its_own() -> None:
    from flotilla.common.runtime_env import SERVICE_ENV

    found = stages()
    runtime_env = " ".join(line for line in found["runtime"] if line.startswith("ENV ")).split()
    triton_env = " ".join(line for line in found["triton-cpu"] if line.startswith("ENV ")).split()
    for name, value in SERVICE_ENV.items():
        assert f"{name}={value}" in runtime_env, name
        assert f"{name}=" in triton_env, f"tritonserver keeps {name} at its defaults"
