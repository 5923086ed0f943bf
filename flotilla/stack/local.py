"""The embedded local stack: every part of the mesh as processes on 127.0.0.1.

    SeaweedFS S3 ─ Triton × R ─ preprocess × W ─ batcher per model ─ router

``LocalStack.start`` brings the parts up in dependency order, waits until
each is healthy (S3 answers with the bucket, Triton reports every model
ready, each Flotilla service answers gRPC health SERVING), and writes the
resolved configuration and a ``stack.json`` that clients (``flotilla
infer``) read. ``stop`` takes them down in reverse order; children also die
with this process, so nothing is orphaned.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import tritonclient.grpc as triton_grpc
from pydantic import SecretStr

from flotilla.common.object_store import ObjectStore
from flotilla.common.server import is_serving
from flotilla.config import Endpoints, FlotillaSettings, dump_settings
from flotilla.errors import StoreUnavailable
from flotilla.stack.components import TritonInstallation, TritonPorts, seaweed_s3
from flotilla.stack.processes import ManagedProcess, free_port, wait_until

log = logging.getLogger(__name__)

SERVICE_START_TIMEOUT_S = 60.0
S3_START_TIMEOUT_S = 60.0


@dataclass
class StackState:
    """What a client needs to reach a running stack (written as stack.json)."""

    router: str
    api_key: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str
    models: list[str]
    triton: list[str] = field(default_factory=list)
    batchers: dict[str, list[str]] = field(default_factory=dict)
    preprocess: list[str] = field(default_factory=list)
    config: str = ""

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__, indent=2) + "\n", encoding="utf-8")
        path.chmod(0o600)  # holds the dev API key and S3 secret

    @classmethod
    def read(cls, path: Path) -> StackState:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def _s3_ready(store: ObjectStore) -> bool:
    try:
        store.ensure_bucket()
    except StoreUnavailable:
        return False
    return True


def triton_ready(address: str, models: list[str]) -> bool:
    try:
        client = triton_grpc.InferenceServerClient(address)
        try:
            return client.is_server_ready() and all(client.is_model_ready(m) for m in models)
        finally:
            client.close()
    except Exception:  # tritonclient raises several types while the server starts
        return False


class LocalStack:
    """Starts and stops the whole mesh locally; use as a context manager."""

    def __init__(self, settings: FlotillaSettings) -> None:
        self.base = settings
        self.host = settings.host
        self.run_dir = settings.run_dir.resolve()
        self.logs = self.run_dir / "logs"
        self.settings: FlotillaSettings | None = None
        """Resolved settings (real endpoints and keys) once started."""
        self.state: StackState | None = None
        self.s3: ManagedProcess | None = None
        self.tritons: list[ManagedProcess] = []
        self.preprocess: list[ManagedProcess] = []
        self.batchers: dict[str, ManagedProcess] = {}
        self.router: ManagedProcess | None = None

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def processes(self) -> list[ManagedProcess]:
        """Every child, in start order."""
        procs = [self.s3, *self.tritons, *self.preprocess, *self.batchers.values(), self.router]
        return [p for p in procs if p is not None]

    def start(self) -> StackState:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in reversed(self.processes()):
            proc.stop()

    # -- start-up ------------------------------------------------------------

    def _start(self) -> StackState:
        self.logs.mkdir(parents=True, exist_ok=True)
        models = list(self.base.models)
        backend_models = [m.backend_model or name for name, m in self.base.models.items()]
        repository = self._prepare_repository(self.base.triton.model_repository.resolve())

        s3_settings = self.base.s3.model_copy(update={"endpoint": f"{self.host}:{free_port(self.host)}"})
        self.s3 = seaweed_s3(
            s3_settings, self.host, int(s3_settings.endpoint.rsplit(":", 1)[1]),
            self.run_dir / "s3-data", self.logs / "seaweedfs.log",
        )
        self.s3.start()

        install = TritonInstallation.prepare(self.run_dir)
        # Replicas and their model instances share this host's cores: each
        # instance gets its share, not all of them.
        instances = max(m.backend.instance_groups for m in self.base.models.values())
        ort_threads = max(1, (os.cpu_count() or 1) // (self.base.triton.replicas * instances))
        for i in range(self.base.triton.replicas):
            ports = TritonPorts.free(self.host)
            proc = install.process(
                f"triton-{i}", host=self.host, ports=ports, model_repository=repository,
                models=backend_models, log_path=self.logs / f"triton-{i}.log", ort_threads=ort_threads,
            )
            proc.start()
            self.tritons.append(proc)
        triton_addresses = [p.address for p in self.tritons]

        store = ObjectStore(s3_settings, timeout_s=2.0, retries=0)
        wait_until(lambda: _s3_ready(store), S3_START_TIMEOUT_S, "SeaweedFS S3", procs=[self.s3])
        for proc in self.tritons:
            wait_until(
                lambda a=proc.address: triton_ready(a, backend_models),  # type: ignore[misc]
                self.base.triton.startup_timeout_s, f"Triton {proc.address}", procs=[proc],
            )

        endpoints = Endpoints(
            router=f"{self.host}:{free_port(self.host)}",
            batchers={m: [f"{self.host}:{free_port(self.host)}"] for m in models},
            preprocess=[f"{self.host}:{free_port(self.host)}" for _ in range(self.base.preprocess.workers)],
            triton=triton_addresses,
        )
        router_settings = self.base.router
        if not router_settings.api_keys:
            router_settings = router_settings.model_copy(
                update={"api_keys": [SecretStr(secrets.token_urlsafe(24))]}
            )
        self.settings = self.base.model_copy(
            update={
                "s3": s3_settings,
                "endpoints": endpoints,
                "router": router_settings,
                "triton": self.base.triton.model_copy(update={"model_repository": repository}),
            }
        )
        config_path = self.run_dir / "flotilla.resolved.yaml"
        dump_settings(self.settings, config_path)
        config_path.chmod(0o600)

        # Tier by tier, each healthy before the next starts, so that no
        # service's first health probes find its upstream still starting.
        for i, address in enumerate(endpoints.preprocess):
            self.preprocess.append(self._service(f"preprocess-{i}", "preprocess", address, config_path))
        self._wait_serving(self.preprocess)
        for model, addresses in endpoints.batchers.items():
            self.batchers[model] = self._service(f"batcher-{model}", "batcher", addresses[0], config_path, model)
        self._wait_serving(list(self.batchers.values()))
        self.router = self._service("router", "router", endpoints.router, config_path)
        self._wait_serving([self.router])

        self.state = StackState(
            router=endpoints.router,
            api_key=self.settings.router.api_keys[0].get_secret_value(),
            s3_endpoint=s3_settings.endpoint,
            s3_access_key=s3_settings.access_key,
            s3_secret_key=s3_settings.secret_key.get_secret_value(),
            s3_bucket=s3_settings.bucket,
            models=models,
            triton=triton_addresses,
            batchers=endpoints.batchers,
            preprocess=endpoints.preprocess,
            config=str(config_path),
        )
        self.state.write(self.run_dir / "stack.json")
        return self.state

    def _prepare_repository(self, source: Path) -> Path:
        """This stack's model repository: each served model's files linked from
        ``source``, its config.pbtxt with the configured instance_group count."""
        target = self.run_dir / "model-repository"
        for name, model in self.base.models.items():
            backend_model = model.backend_model or name
            src, dst = source / backend_model, target / backend_model
            if not (src / "config.pbtxt").exists():
                raise FileNotFoundError(f"model {backend_model!r} is missing from {source}; run `make models`")
            dst.mkdir(parents=True, exist_ok=True)
            for entry in src.iterdir():
                link = dst / entry.name
                if entry.name != "config.pbtxt" and not link.exists():
                    link.symlink_to(entry.resolve())
            config = (src / "config.pbtxt").read_text(encoding="utf-8")
            group = f"instance_group [ {{ kind: KIND_CPU, count: {model.backend.instance_groups} }} ]"
            config, found = re.subn(r"instance_group\s*\[[^\]]*\]", group, config)
            (dst / "config.pbtxt").write_text(config if found else f"{config}{group}\n", encoding="utf-8")
        return target

    def _service(self, name: str, role: str, address: str, config: Path, model: str | None = None) -> ManagedProcess:
        port = address.rsplit(":", 1)[1]
        argv = [sys.executable, "-m", "flotilla", "serve", role, "--config", str(config), "--port", port]
        if model is not None:
            argv += ["--model", model]
        proc = ManagedProcess(name, argv, log_path=self.logs / f"{name}.log", address=address)
        proc.start()
        return proc

    @staticmethod
    def _wait_serving(procs: list[ManagedProcess]) -> None:
        for proc in procs:
            wait_until(lambda a=proc.address: is_serving(a), SERVICE_START_TIMEOUT_S, proc.name, procs=[proc])  # type: ignore[misc]

    def flotilla_services(self) -> list[ManagedProcess]:
        """The Flotilla gRPC services (each answers gRPC health)."""
        return [*self.preprocess, *self.batchers.values(), *([self.router] if self.router else [])]

    def describe(self) -> str:
        """Human-readable endpoints, for `flotilla up`."""
        assert self.state is not None and self.settings is not None
        lines = [
            f"router (gRPC):       {self.state.router}",
            f"API key (dev):       {self.state.api_key}",
            f"S3 endpoint:         http://{self.state.s3_endpoint}  bucket {self.state.s3_bucket}",
            f"Triton replicas:     {', '.join(self.state.triton)}",
            f"preprocess workers:  {', '.join(self.settings.endpoints.preprocess)}",
        ]
        lines += [f"batcher {m}: {', '.join(a)}" for m, a in self.settings.endpoints.batchers.items()]
        lines += [f"models:              {', '.join(self.state.models)}", f"logs:                {self.logs}"]
        return "\n".join(lines)
