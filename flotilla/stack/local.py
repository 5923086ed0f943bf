"""The embedded local stack: every part of the mesh as processes on 127.0.0.1.

    SeaweedFS S3 ─ Triton × R (empty) ─ controller ─ preprocess × W ─ router
                                             └─ batcher shards × S (+ a dedicated batcher per model that asks)

``LocalStack.start`` brings the parts up in dependency order and waits
until each is healthy. Triton replicas start empty; the controller places
models on them. The models configured under ``models:`` are deployed
through the registry like any operator would (artifact uploaded to S3, then
``Deploy``). The ``batcher.shards`` shared batcher processes (batcher-0,
batcher-1, ...) start with the stack, with no models: the controller
assigns each registered model to shards as they heartbeat. A model whose
spec sets ``dedicated_batcher`` gets a batcher process of its own
(batcher-<model>) that comes and goes with its registry record: a thread
follows the controller's fleet and starts or stops them. A supervisor
restarts any process that dies, with backoff. The resolved configuration
and ``stack.json`` (what ``flotilla infer`` and ``flotilla models`` read;
``flotilla.stack.state``) are written to the run directory. ``stop`` marks
``stack.json`` stopped, then takes everything down in reverse order;
children also die with this process. A stack started again in the same run
directory finds the registry S3 kept: the models registered as configured
stay, those whose configuration changed are replaced, and what named the
earlier stack's processes (batcher addresses, per-replica conditions) is
forgotten first.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import tritonclient.grpc as triton_grpc
from pydantic import SecretStr

from flotilla.api.v1 import controller_pb2, controller_pb2_grpc
from flotilla.clients.models import ModelsClient, missing_labels, upload_artifact
from flotilla.common.fleet import FleetState, spec_of
from flotilla.common.object_store import ObjectStore
from flotilla.common.probe import is_serving
from flotilla.common.runtime_env import service_env
from flotilla.common.tls import PLAINTEXT, Dialer
from flotilla.common.wire import CONTROL_CHANNEL_OPTIONS
from flotilla.config import (
    Endpoints,
    FlotillaSettings,
    ModelSettings,
    S3Settings,
    TlsSettings,
    dump_settings,
    spec_differences,
)
from flotilla.errors import AlreadyExists, FlotillaError, StoreUnavailable
from flotilla.services.controller.registry import ModelRecord, ObjectStoreRecords
from flotilla.services.preprocess.triton.shm import SHM_DIR, remove_stale
from flotilla.stack.components import TritonInstallation, TritonPorts, seaweed_s3
from flotilla.stack.processes import ManagedProcess, free_port, wait_until
from flotilla.stack.state import StackState, mark_stopped, now_iso, process_start_ticks
from flotilla.stack.supervisor import Supervisor

if TYPE_CHECKING:
    from flotilla.common.certs import CertificateAuthority, IssuedFiles

log = logging.getLogger(__name__)

SERVICE_START_TIMEOUT_S = 60.0
S3_START_TIMEOUT_S = 60.0
S3_PORT_ATTEMPTS = 3
WEED_PORT_TAKEN = "Port allocation failed"
"""What weed logs when a port it was given is not available (it then exits)."""
MODEL_READY_TIMEOUT_S = 180.0
TRITON_SHM_PREFIX = "flotilla-triton-"
"""Replicas' Python-backend /dev/shm files: flotilla-triton-<stack pid>-<stack id>-<replica>-..."""
TLS_ROLES = ("controller", "router", "batcher", "preprocess")
"""The roles that get a certificate of their own (its common name) when the stack runs with TLS."""
ADMIN_IDENTITY = "flotilla-admin"
"""The certificate the stack and its CLI present (``controller.admin_identities``' default)."""
S3_IDENTITY = "s3"
"""With TLS on, SeaweedFS's certificate: its S3 port speaks HTTPS only, checked against the stack's CA."""
TRITON_IDENTITY = "triton"
"""With TLS on and ``tls.triton``, the replicas' certificate: their gRPC endpoints require mutual TLS."""


def s3_ready(store: ObjectStore) -> bool:
    try:
        store.ensure_bucket()
    except StoreUnavailable:
        return False
    return True


def forget_previous_stack(s3: S3Settings, bucket: str, prefix: str) -> list[str]:
    """Clear, in a registry kept from an earlier stack in this run directory, what named that
    stack's processes: its batchers' addresses and its replicas' Loaded conditions. This stack
    starts its own on new ports; left listed, the router would route to dead addresses and a model
    would wait for batchers that never answer. Returns the models whose records changed."""
    records = ObjectStoreRecords(ObjectStore(s3.model_copy(update={"bucket": bucket}), timeout_s=10.0), prefix)
    changed = []
    for data in records.load_all():
        record = ModelRecord.from_json(data)
        per_replica = [key for key in record.conditions if key[1]]
        if not record.batchers and not per_replica:
            continue
        record.batchers = []
        for key in per_replica:
            del record.conditions[key]
        records.save(record.name, record.to_json())
        changed.append(record.name)
    return changed


def triton_ready(address: str, dialer: Dialer = PLAINTEXT) -> bool:
    """Whether the replica at ``address`` reports ready (over TLS with ``dialer``'s certificate when it
    is secure)."""
    try:
        creds = dialer.credentials() if dialer.secure else None
        client = triton_grpc.InferenceServerClient(address, creds=creds)
        try:
            return bool(client.is_server_ready())
        finally:
            client.close()
    except Exception:  # tritonclient raises several types while the server starts
        return False


def spec_differs(configured: ModelSettings, registered: dict[str, Any]) -> bool:
    """Whether a registered spec is not what deploying ``configured`` would register
    (``config.spec_differences``): replacing a model that is already right would stop its batcher and
    unload its copies for nothing at every start of the stack."""
    return bool(spec_differences(configured, registered))


def default_storage_uri(settings: FlotillaSettings, name: str) -> str:
    return f"s3://{settings.controller.artifact_bucket}/{name}"


class BatcherManager:
    """Follows the controller's fleet: one dedicated batcher process per model whose spec asks for
    one (``dedicated_batcher``); the shared shards are started with the stack.

    Runs in its own thread for the stack's lifetime. The batchers it starts
    get the parent-death signal when that thread ends, so the thread outlives
    them: ``halt`` stops following the fleet, and the thread ends only at
    ``join``, after the stack has stopped the batchers gracefully. The fleet
    it holds (``models``) also tells the stack which batcher hosts which
    model (``LocalStack.batchers``).
    """

    def __init__(self, stack: LocalStack, controller: str, config: Path) -> None:
        self.stack = stack
        self.controller = controller
        self.config = config
        self._stopping = threading.Event()
        self._released = threading.Event()
        self._call: grpc.RpcContext | None = None  # the fleet watch (cancel ends it)
        self._thread = threading.Thread(target=self._run, name="batchers", daemon=True)
        self._lock = threading.Lock()
        self.fleet = FleetState()
        """The fleet as the latest WatchFleet message left it (read under the lock: ``models``)."""
        self.generation = 0

    def start(self) -> None:
        self._thread.start()

    def halt(self) -> None:
        """Stop following the fleet (no batcher is started or stopped after this)."""
        self._stopping.set()
        if self._call is not None:
            self._call.cancel()

    def join(self) -> None:
        """Let the thread end (its batchers must be stopped by now)."""
        self.halt()
        self._released.set()
        self._thread.join(timeout=10)

    def models(self) -> dict[str, controller_pb2.ModelStatus]:
        """Every registered model's status, as the fleet last said."""
        with self._lock:
            return dict(self.fleet.models)

    def _run(self) -> None:
        try:
            self._follow()
        finally:
            self._released.wait()

    def _follow(self) -> None:
        while not self._stopping.is_set():
            with self.stack.dialer.channel(self.controller, CONTROL_CHANNEL_OPTIONS) as channel:
                stub = controller_pb2_grpc.ControllerStub(channel)
                self._call = call = stub.WatchFleet(controller_pb2.WatchFleetRequest())
                try:
                    for message in call:  # the whole fleet first, then deltas
                        self._apply(message)
                except grpc.RpcError:
                    pass  # controller restarting, or the stack stopping
            self._stopping.wait(0.5)

    def _apply(self, message: controller_pb2.Fleet) -> None:
        with self._lock:
            change = self.fleet.apply(message)
            wanted = {name for name in change.changed if spec_of(self.fleet.models[name]).dedicated_batcher}
        dedicated = self.stack.dedicated
        unwanted = [m for m in [*change.removed, *change.changed] if m in dedicated and m not in wanted]
        for model in unwanted:
            proc = dedicated.pop(model)
            self.stack.supervisor.remove(proc.name)
            proc.stop()
            log.info("stopped the dedicated batcher of %s (model undeployed or no longer dedicated)", model)
        started = [m for m in sorted(wanted) if m not in dedicated and not self._stopping.is_set()]
        for model in started:
            address = f"{self.stack.host}:{free_port(self.stack.host)}"
            proc = self.stack.service(f"batcher-{model}", "batcher", address, self.config, model)
            dedicated[model] = proc
            self.stack.supervisor.add(proc)
            log.info("started the dedicated batcher of %s on %s", model, address)
        self.generation = change.generation
        if started or unwanted:
            self.stack.write_targets()


class BatcherView(Mapping[str, ManagedProcess]):
    """Model -> a batcher process hosting it now: its dedicated batcher if it has one, else the first
    shard the fleet lists for it. Read from the fleet the stack follows; a model not (yet) there is
    looked up at the controller."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack

    def _processes(self) -> dict[str, ManagedProcess]:
        return {p.address: p for p in self.stack.batcher_processes()}

    def _host(self, status: controller_pb2.ModelStatus, by_address: dict[str, ManagedProcess]) -> ManagedProcess | None:
        dedicated = self.stack.dedicated.get(status.name)
        if dedicated is not None and dedicated.address in status.batchers:
            return dedicated
        return next((by_address[a] for a in status.batchers if a in by_address), None)

    def _hosted(self) -> dict[str, ManagedProcess]:
        manager = self.stack.batcher_manager
        by_address = self._processes()
        models = manager.models() if manager is not None else {}
        hosts = {name: self._host(status, by_address) for name, status in models.items()}
        return {name: proc for name, proc in hosts.items() if proc is not None}

    def __getitem__(self, model: str) -> ManagedProcess:
        found = self._hosted().get(model)
        if found is not None:
            return found
        if self.stack.settings is None:
            raise KeyError(model)
        with self.stack.models_client() as client:  # the fleet this stack follows may be a moment behind
            try:
                status = client.status(model)
            except FlotillaError:
                raise KeyError(model) from None
        found = self._host(status, self._processes())
        if found is None:
            raise KeyError(model)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._hosted()))

    def __len__(self) -> int:
        return len(self._hosted())


def _tier_of(process: str) -> str:
    """triton-0 -> triton, batcher-open-nsfw -> batcher, router -> router."""
    for tier in ("triton", "batcher", "preprocess", "controller", "router", "seaweedfs", "prometheus"):
        if process.startswith(tier):
            return tier
    return process


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
        self.shm_prefix = f"{TRITON_SHM_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-"
        """The replicas' Python-backend shared memory files start with this (one stack's own)."""
        self.controller: ManagedProcess | None = None
        self.preprocess: list[ManagedProcess] = []
        self.shards: list[ManagedProcess] = []
        """The shared batcher processes (``batcher.shards``): batcher-0, batcher-1, ..."""
        self.dedicated: dict[str, ManagedProcess] = {}
        """Model -> its dedicated batcher (batcher-<model>), for models whose spec sets dedicated_batcher."""
        self.batchers = BatcherView(self)
        """Model -> a batcher process hosting it now."""
        self.routers: list[ManagedProcess] = []
        """``router.processes`` router processes sharing the router's port (SO_REUSEPORT)."""
        self.prometheus: ManagedProcess | None = None
        """Started when settings.observability.prometheus is on; its HTTP API at prometheus.address."""
        self.supervisor = Supervisor()
        self.batcher_manager: BatcherManager | None = None
        self.generated_api_key = False
        """The stack made the dev API key (none was configured): ``describe`` shows it."""
        self.tls_files: dict[str, IssuedFiles] = {}
        self.tls_authority: CertificateAuthority | None = None
        """The throwaway CA (kept in memory only: it renews a certificate, as in a test of renewal)."""
        """With ``tls.enabled``: each role's certificate (and ``ADMIN_IDENTITY``'s, the stack's own and its
        clients'), issued by a throwaway CA at start."""
        self.dialer = PLAINTEXT
        """How the stack (and its clients) reach its services: TLS with the admin identity's certificate."""

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
        procs = [self.s3, *self.tritons, self.controller, *self.preprocess, *self.batcher_processes(),
                 *self.routers, self.prometheus]
        return [p for p in procs if p is not None]

    def start(self) -> StackState:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.state is not None:  # first: clients now hear "not running", not a dead address
            mark_stopped(self.state_file, self.state)
        self.supervisor.stop()  # nothing is restarted while the stack stops
        if self.batcher_manager is not None:
            self.batcher_manager.halt()
        for proc in reversed(self.processes()):
            proc.stop()
        if self.batcher_manager is not None:
            self.batcher_manager.join()
        for leftover in SHM_DIR.glob(f"{self.shm_prefix}*"):  # left by replicas that were killed outright
            leftover.unlink(missing_ok=True)

    # -- start-up ------------------------------------------------------------

    def start_object_store(self) -> S3Settings:
        """Start SeaweedFS alone and wait until S3 answers; its S3 settings. ``start`` does this as its
        first step, overlapped with the replicas' start; this one is for a test of that step alone."""
        return self._wait_for_s3(self._launch_s3())

    def _launch_s3(self) -> S3Settings:
        """Start SeaweedFS on free ports; its S3 settings (not yet ready: ``_wait_for_s3``). With TLS
        (an ``S3_IDENTITY`` certificate issued), S3 is HTTPS only and checked against the stack's CA."""
        s3_settings = self.base.s3.model_copy(update={"endpoint": f"{self.host}:{free_port(self.host)}"})
        certificate = self.tls_files.get(S3_IDENTITY)
        if certificate is not None:
            s3_settings = s3_settings.model_copy(update={"secure": True, "ca_file": certificate.ca_file})
        self.s3 = seaweed_s3(
            s3_settings, self.host, int(s3_settings.endpoint.rsplit(":", 1)[1]),
            self.run_dir / "s3-data", self.logs / "seaweedfs.log", tls=certificate,
        )
        self.s3.start()
        return s3_settings

    def _wait_for_s3(self, s3_settings: S3Settings) -> S3Settings:
        """Wait until S3 answers. A port chosen free can be taken before weed binds it (any
        process's outgoing connection may get it): weed then exits at once, and is started
        again on other ports."""
        assert self.s3 is not None  # started by _launch_s3
        for attempt in range(1, S3_PORT_ATTEMPTS + 1):
            store = ObjectStore(s3_settings, timeout_s=2.0, retries=0)
            try:
                wait_until(functools.partial(s3_ready, store), S3_START_TIMEOUT_S, "SeaweedFS S3", procs=[self.s3])
                return s3_settings
            except RuntimeError as exc:
                if WEED_PORT_TAKEN not in str(exc) or attempt == S3_PORT_ATTEMPTS:
                    raise
                log.warning("SeaweedFS: a port chosen for it was taken before it bound it; starting it on other ports")
                assert self.s3 is not None
                self.s3.stop()
                s3_settings = self._launch_s3()
        raise AssertionError("unreachable")

    def _start(self) -> StackState:
        self.logs.mkdir(parents=True, exist_ok=True)
        tls = self._issue_certificates()
        s3_settings = self._launch_s3()

        install = TritonInstallation.prepare(self.run_dir)
        remove_stale(TRITON_SHM_PREFIX)
        # Replicas share this host's cores: each ONNX Runtime session gets a share.
        ort_threads = max(1, (os.cpu_count() or 1) // self.base.triton.replicas)
        replica_dirs = []
        triton_http = []
        # With TLS to Triton: mutual TLS on gRPC, no HTTP endpoint (none listed: workers use gRPC).
        triton_tls = self.tls_files.get(TRITON_IDENTITY)
        triton_dialer = self.dialer if triton_tls is not None else PLAINTEXT
        for i in range(self.base.triton.replicas):
            replica_dir = self.run_dir / f"triton-{i}"
            repository = replica_dir / "models"
            shutil.rmtree(repository, ignore_errors=True)  # starts empty; the cache/ beside it is kept
            repository.mkdir(parents=True)
            replica_dirs.append(replica_dir)
            ports = TritonPorts.free(self.host)
            if triton_tls is None:
                triton_http.append(f"{self.host}:{ports.http}")
            proc = install.process(
                f"triton-{i}", host=self.host, ports=ports, model_repository=repository,
                log_path=self.logs / f"triton-{i}.log", ort_threads=ort_threads,
                shm_prefix=f"{self.shm_prefix}{i}-", tls=triton_tls,
            )
            proc.start()
            self.tritons.append(proc)
        triton_addresses = [p.address for p in self.tritons]

        s3_settings = self._wait_for_s3(s3_settings)
        forgotten = forget_previous_stack(
            s3_settings, self.base.controller.artifact_bucket, self.base.controller.registry_prefix
        )
        if forgotten:
            log.info("registry kept from an earlier stack: %s (their old batchers and replicas forgotten)",
                     ", ".join(forgotten))
        for proc in self.tritons:
            wait_until(functools.partial(triton_ready, proc.address, triton_dialer),
                       self.base.triton.startup_timeout_s, f"Triton {proc.address}", procs=[proc])

        endpoints = Endpoints(
            router=f"{self.host}:{free_port(self.host)}",
            controller=f"{self.host}:{free_port(self.host)}",
            preprocess=[f"{self.host}:{free_port(self.host)}" for _ in range(self.base.preprocess.workers)],
            triton=triton_addresses,
            triton_http=triton_http,
        )
        # The router's KServe v2 HTTP front door, on a free port like every other (router.http_port).
        router_settings = self.base.router.model_copy(update={"http_port": free_port(self.host)})
        self.generated_api_key = not router_settings.api_keys
        if self.generated_api_key:
            router_settings = router_settings.model_copy(
                update={"api_keys": [SecretStr(secrets.token_urlsafe(24))]}
            )
        # The control plane's admin key (Deploy, Undeploy, key management, SetBatching): generated like the
        # dev API key unless configured, and written to stack.json for `flotilla models`/`keys`.
        controller_settings = self.base.controller.model_copy(update={"replica_dirs": replica_dirs})
        if not controller_settings.admin_keys:
            controller_settings = controller_settings.model_copy(
                update={"admin_keys": [SecretStr(secrets.token_urlsafe(24))]}
            )
        observability = self.base.observability
        if observability.tracing and observability.trace_exporter == "file" and observability.trace_dir is None:
            observability = observability.model_copy(update={"trace_dir": self.run_dir / "traces"})
        self.settings = self.base.model_copy(
            update={
                "tls": tls,
                "observability": observability,
                "s3": s3_settings,
                "endpoints": endpoints,
                "router": router_settings,
                "controller": controller_settings,
            }
        )
        config_path = self.run_dir / "flotilla.resolved.yaml"
        dump_settings(self.settings, config_path)

        # Tier by tier, each healthy before the next starts.
        self.controller = self.service("controller", "controller", endpoints.controller, config_path)
        self._wait_serving([self.controller])
        for i, address in enumerate(endpoints.preprocess):
            self.preprocess.append(self.service(f"preprocess-{i}", "preprocess", address, config_path))
        self._wait_serving(self.preprocess)
        # The shards serve at once, with no models; the controller gives them models as they heartbeat.
        self.shards = [
            self.service(f"batcher-{i}", "batcher", f"{self.host}:{free_port(self.host)}", config_path)
            for i in range(self.base.batcher.shards)
        ]
        self._wait_serving(self.shards)
        self.routers = [
            self.service("router" if i == 0 else f"router-{i}", "router", endpoints.router, config_path)
            for i in range(self.base.router.processes)
        ]
        self._wait_serving(self.routers)
        self.write_targets()
        if self.base.observability.prometheus:
            from flotilla.stack.prometheus import prometheus_process

            self.prometheus = prometheus_process(
                self.run_dir, self.host, free_port(self.host), self.targets_file,
                scrape_interval_s=self.base.observability.prometheus_scrape_interval_s,
                log_path=self.logs / "prometheus.log",
            )
            self.prometheus.start()
            self.write_targets()  # Prometheus scrapes itself too
        self.batcher_manager = BatcherManager(self, endpoints.controller, config_path)
        self.batcher_manager.start()
        for child in [self.s3, *self.tritons, self.controller, *self.preprocess, *self.shards, *self.routers,
                      self.prometheus]:
            if child is not None:
                self.supervisor.add(child)
        self.supervisor.start()

        self.deploy_configured_models()
        self.state = StackState(
            router=endpoints.router,
            api_key=self.settings.router.api_keys[0].get_secret_value(),
            admin_key=self.admin_key,
            s3_endpoint=s3_settings.endpoint,
            s3_access_key=s3_settings.access_key,
            s3_secret_key=s3_settings.secret_key.get_secret_value(),
            s3_bucket=s3_settings.bucket,
            s3_secure=s3_settings.secure,
            s3_ca_file=str(s3_settings.ca_file) if s3_settings.ca_file is not None else "",
            models=list(self.base.models),
            controller=endpoints.controller,
            router_http=f"{self.host}:{self.settings.router.http_port}",
            tls_ca=str(tls.ca_file) if tls.enabled else "",
            tls_cert=str(tls.cert_file) if tls.enabled else "",
            tls_key=str(tls.key_file) if tls.enabled else "",
            artifact_bucket=self.settings.controller.artifact_bucket,
            triton=triton_addresses,
            triton_http=triton_http,
            preprocess=endpoints.preprocess,
            batcher_shards=[p.address for p in self.shards],
            config=str(config_path),
            metrics=self.metrics_targets(),
            pid=os.getpid(),
            pid_start_ticks=process_start_ticks(os.getpid()) or 0,
            started_at=now_iso(),
        )
        self.state.write(self.state_file)
        return self.state

    def _issue_certificates(self) -> TlsSettings:
        """With ``tls.enabled``: a throwaway CA and a certificate per role in ``run_dir/tls`` (each service
        gets its own through its environment); the settings point at the admin identity's, which the
        stack and its clients present. Off: the settings as they are."""
        if not self.base.tls.enabled:
            return self.base.tls
        from flotilla.common.certs import local_mesh_certificates

        identities = [*TLS_ROLES, ADMIN_IDENTITY, S3_IDENTITY, *([TRITON_IDENTITY] if self.base.tls.triton else [])]
        self.tls_authority, self.tls_files = local_mesh_certificates(self.run_dir / "tls", identities)
        admin = self.tls_files[ADMIN_IDENTITY]
        tls = self.base.tls.model_copy(
            update={"ca_file": admin.ca_file, "cert_file": admin.cert_file, "key_file": admin.key_file, "health_port": 0}
        )
        self.dialer = Dialer(tls)
        return tls

    def _role_env(self, role: str) -> dict[str, str] | None:
        """A service's environment: its own certificate with TLS on (None: the stack's environment)."""
        files = self.tls_files.get(role)
        if files is None:
            return None
        return {**os.environ, "FLOTILLA_TLS__CERT_FILE": str(files.cert_file),
                "FLOTILLA_TLS__KEY_FILE": str(files.key_file)}

    @property
    def state_file(self) -> Path:
        """``stack.json``: written once the stack is up, marked stopped when it stops."""
        return self.run_dir / "stack.json"

    def metrics_targets(self) -> dict[str, str]:
        """Every process's metrics endpoint now (Triton's own included)."""
        return {p.name: p.metrics_address for p in self.processes() if p.metrics_address}

    @property
    def targets_file(self) -> Path:
        return self.run_dir / "metrics-targets.json"

    def write_targets(self) -> None:
        """The metrics endpoints in Prometheus file_sd format, rewritten whenever batchers
        come or go (Prometheus and `flotilla top` re-read it)."""
        groups = [
            {"targets": [address], "labels": {"process": name, "tier": _tier_of(name)}}
            for name, address in self.metrics_targets().items()
        ]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.targets_file)

    @property
    def admin_key(self) -> str:
        """The control plane's admin key (the first of controller.admin_keys)."""
        assert self.settings is not None
        keys = self.settings.controller.admin_keys
        return keys[0].get_secret_value() if keys else ""

    def models_client(self) -> ModelsClient:
        assert self.settings is not None
        return ModelsClient(self.settings.endpoints.controller, admin_key=self.admin_key, dialer=self.dialer)

    def deploy(self, name: str, spec: ModelSettings, *, replace: bool = False, wait: bool = True) -> None:
        """Upload ``spec.artifact`` (if set) and deploy through the registry, as an operator would."""
        assert self.settings is not None
        if not spec.storage_uri:
            spec = spec.model_copy(update={"storage_uri": default_storage_uri(self.settings, name)})
        if spec.artifact is not None:
            files = upload_artifact(self.settings.s3, Path(spec.artifact), spec.storage_uri)
            warning = missing_labels(Path(spec.artifact), files) if not spec.labels and not spec.labels_file else None
            if warning:
                log.warning("%s: %s", name, warning)
            spec = spec.model_copy(update={"artifact": None})
        with self.models_client() as client:
            try:
                client.deploy(name, spec, replace=replace)
            except AlreadyExists:  # registered by an earlier run in this directory
                registered = json.loads(client.status(name).spec_json)
                if spec_differs(spec, registered):
                    log.info("%s is registered with another spec; deploying the configuration's (--replace)", name)
                    client.deploy(name, spec, replace=True)
        if wait:
            self.wait_model(name)

    def deploy_configured_models(self) -> None:
        for name, spec in self.base.models.items():
            self.deploy(name, spec)

    def wait_model(self, name: str, timeout_s: float = MODEL_READY_TIMEOUT_S) -> None:
        """Until the model's batcher is registered and serving and (min_copies > 0) a copy is ready."""
        with self.models_client() as client:
            def ready() -> bool:
                status = client.status(name)
                spec = json.loads(status.spec_json)
                copies_ok = spec["min_copies"] == 0 or any(c.state == "ready" for c in status.copies)
                return copies_ok and bool(status.batchers) and all(
                    is_serving(b, dialer=self.dialer) for b in status.batchers
                )

            wait_until(ready, timeout_s, f"model {name}", procs=[p for p in [self.controller] if p])
        time.sleep(0.2)  # the router applies the same fleet snapshot; let it land

    def service(self, name: str, role: str, address: str, config: Path, model: str | None = None) -> ManagedProcess:
        port = address.rsplit(":", 1)[1]
        metrics_port = free_port(self.host)
        argv = [sys.executable, "-m", "flotilla", "serve", role, "--config", str(config), "--port", port,
                "--metrics-port", str(metrics_port)]
        if model is not None:
            argv += ["--model", model]
        proc = ManagedProcess(
            name, argv, log_path=self.logs / f"{name}.log", address=address,
            metrics_address=f"{self.host}:{metrics_port}", env=service_env(self._role_env(role)),
        )
        proc.start()
        return proc

    def _wait_serving(self, procs: list[ManagedProcess]) -> None:
        for proc in procs:
            wait_until(functools.partial(is_serving, proc.address, dialer=self.dialer), SERVICE_START_TIMEOUT_S,
                       proc.name, procs=[proc])

    @property
    def router(self) -> ManagedProcess | None:
        """The first router process (the only one unless ``router.processes`` > 1)."""
        return self.routers[0] if self.routers else None

    def flotilla_services(self) -> list[ManagedProcess]:
        """The Flotilla gRPC services (each answers gRPC health)."""
        procs = [self.controller, *self.preprocess, *self.batcher_processes(), *self.routers]
        return [p for p in procs if p is not None]

    def batcher_processes(self) -> list[ManagedProcess]:
        """The shards, then the dedicated batchers."""
        dedicated = self.dedicated.copy()  # the fleet's thread changes it
        return [*self.shards, *(dedicated[m] for m in sorted(dedicated))]

    def describe(self) -> str:
        """Human-readable endpoints, for `flotilla up`."""
        assert self.state is not None and self.settings is not None
        secure = self.settings.tls.enabled
        lines = [
            f"router (gRPC):       {self.state.router}" + ("  (TLS)" if secure else ""),
            f"router (HTTP):       {'https' if secure else 'http'}://{self.state.router_http}/v2  (KServe v2 REST)",
            f"controller (gRPC):   {self.state.controller}",
            # A key the stack made is shown once, here; a configured one is its owner's to know.
            f"API key (dev):       {self.state.api_key}" if self.generated_api_key
            else "API key:             configured (router.api_keys)",
            f"admin key:           in {self.state_file} (admin_key; `flotilla models`/`keys` read it there)",
            *([f"TLS:                 CA {self.state.tls_ca}; mutual TLS between the tiers; the CLI presents "
               f"{self.state.tls_cert} (admin identity {ADMIN_IDENTITY})"] if secure else []),
            f"S3 endpoint:         {'https' if self.state.s3_secure else 'http'}://{self.state.s3_endpoint}  bucket {self.state.s3_bucket}, "
            f"artifacts {self.state.artifact_bucket}",
            f"Triton replicas:     {', '.join(self.state.triton)}  (budgets "
            + ", ".join(f"{self.settings.controller.budget_mb(i):.0f}" for i in range(len(self.state.triton)))
            + " MiB)",
            f"preprocess workers:  {', '.join(self.settings.endpoints.preprocess)}",
        ]
        lines += [f"batcher shards:      {', '.join(p.address for p in self.shards)}"]
        lines += [f"batcher {m}: {p.address} (dedicated)" for m, p in sorted(self.dedicated.copy().items())]
        lines += ["metrics (Prometheus, /metrics):"]
        lines += [f"  {name:<32} http://{address}/metrics" for name, address in self.metrics_targets().items()]
        lines += [f"models:              {', '.join(self.state.models) or 'none'}", f"logs:                {self.logs}"]
        return "\n".join(lines)
