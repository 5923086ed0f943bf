"""One Triton replica as the controller drives it: load, unload, warm up, measure.

Replicas run with ``--model-control-mode=explicit --disable-auto-complete-config``
and start empty. Loading a model lays out ``<repository>/<model>/<version>/``
with the generic Python-backend ONNX wrapper (``model.py``) and the artifact's
``model.onnx`` linked from the replica's verified cache, then calls Triton's
load API with a config built from the registry record (auto-complete would
start a throwaway stub and cost ~1.3 s per load).

Memory (``controller.memory_kind``), measured after a warm-up at the model's batch size:

- host: Triton reports none per model on CPU, so a copy's memory is the USS
  (private resident memory) of that model's ``triton_python_backend_stub``
  processes - found by the model's path in their command line - plus their
  shared-memory regions.
- gpu: the growth of the replica's ``nv_gpu_memory_used_bytes`` from just before
  the copy's load to after its warm-up (``gpu_memory.GpuMemoryMeter``, which says
  how loads overlapping on one replica share it), and a budget of at most the
  GPUs' ``nv_gpu_memory_total_bytes`` less a reserve per GPU.

With TLS to Triton (``tls.enabled`` and ``tls.triton``) the client dials the replica's gRPC endpoint
with the controller's own certificate (mutual TLS, ``Dialer``) and reopens when the files are renewed.
The controller never calls a replica's HTTP endpoint (``http_address`` is only passed on to the
workers); with memory_kind gpu it reads the replica's metrics endpoint, plaintext HTTP whatever the
TLS settings (Triton serves no TLS there; read-only counters).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import psutil
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from flotilla.common.tls import PLAINTEXT, Dialer, TlsFilesError
from flotilla.config import ModelSettings
from flotilla.errors import ModelLoadFailed
from flotilla.services.controller.artifacts import ArtifactCache
from flotilla.services.controller.gpu_memory import GpuMemoryError, GpuMemoryMeter, GpuMemorySource

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_TRITON_DTYPES = {"UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32"}
_NUMPY_DTYPES = {"UINT8": np.uint8, "FP32": np.float32}
PAGE_KB = 1024
WATCH_TIMEOUT_S = 2.0
"""How long the controller's liveness check and repository index of a replica may take: a replica
whose process hangs (stopped, wedged) with its host up keeps its connections open and would never
answer; past this it counts as down and its copies leave the pools."""


def backend_name(name: str, spec: ModelSettings) -> str:
    return spec.backend_model or name


def input_dims(spec: ModelSettings) -> list[int]:
    size = spec.input
    if size.layout == "NHWC":
        return [size.height_px, size.width_px, 3]
    return [3, size.height_px, size.width_px]


def triton_config(
    name: str, spec: ModelSettings, *, backend: str = "python", instance_kind: str = "KIND_CPU"
) -> dict[str, Any]:
    """The model config Triton loads, from the registry record alone.

    ``backend`` python: the generic wrapper (``model.py``) runs the ONNX file
    with ONNX Runtime; onnxruntime: Triton's native backend runs it (the
    official image; GPU instances with ``instance_kind`` KIND_GPU).
    """
    config: dict[str, Any] = {
        "name": backend_name(name, spec),
        "backend": backend,
        "max_batch_size": spec.backend.max_batch_size,
        "input": [{"name": spec.input.name, "data_type": _TRITON_DTYPES[spec.input.dtype], "dims": input_dims(spec)}],
        # Scores per class; the class count comes from the artifact, not the config.
        "output": [{"name": spec.output_name, "data_type": "TYPE_FP32", "dims": [-1]}],
        "instance_group": [{"kind": instance_kind, "count": spec.backend.instance_groups}],
        "version_policy": {"specific": {"versions": list(spec.versions)}},
    }
    if backend == "python":
        config["parameters"] = {"onnx_file": {"string_value": "model.onnx"}}
    else:
        config["default_model_filename"] = "model.onnx"
    if spec.backend.triton_dynamic_batching_us is not None:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": spec.backend.triton_dynamic_batching_us}
    return config


def _wrapper_source() -> bytes:
    return (resources.files("flotilla.modelbuild") / "triton_onnx_model.py").read_bytes()


def _link_or_copy(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)  # same bytes, no second copy on disk
    except OSError:
        shutil.copyfile(source, target)


class TritonReplica:
    """The controller's handle on one Triton server (grpc via tritonclient)."""

    def __init__(
        self,
        address: str,
        budget_mb: float,
        repository: Path,
        cache: ArtifactCache,
        *,
        backend: str = "python",
        instance_kind: str = "KIND_CPU",
        http_address: str = "",
        memory_kind: Literal["host", "gpu"] = "host",
        gpu_memory: GpuMemorySource | GpuMemoryMeter | None = None,
        dialer: Dialer = PLAINTEXT,
    ) -> None:
        """``memory_kind`` gpu needs ``gpu_memory``: the replica's metrics (``gpu_memory.TritonGpuMetrics``)
        or a meter over them; the budget then shrinks to what its GPUs hold once a reading gives that.
        ``dialer``: how the replica's gRPC endpoint is reached (TLS with this process's certificate when
        Triton serves TLS, ``tls.triton``)."""
        self.address = address
        self.http_address = http_address
        """Its HTTP endpoint, for the workers (the fleet carries it); the controller itself speaks gRPC."""
        self.configured_budget_mb = budget_mb
        self.budget_mb = budget_mb
        """What placement may put here: the configured budget, with memory_kind gpu at most the GPUs'
        total less the reserve (from the first reading on)."""
        self.memory_kind = memory_kind
        self.gpu: GpuMemoryMeter | None = None
        if memory_kind == "gpu":
            if gpu_memory is None:
                raise ValueError(f"replica {address}: memory_kind gpu needs its Triton metrics (endpoints.triton_metrics)")
            self.gpu = gpu_memory if isinstance(gpu_memory, GpuMemoryMeter) else GpuMemoryMeter(gpu_memory)
        self._gpu_problem = ""
        """The last GPU reading's error, logged once until it changes or clears."""
        self.repository = repository
        self.cache = cache
        self.backend = backend
        self.instance_kind = instance_kind
        self.dialer = dialer
        self._retiring: set[asyncio.Task[None]] = set()
        self._open()

    RETIRE_GRACE_S = 300.0
    """How long a client opened with renewed-away certificate files is kept for the calls still on it
    (a load, bounded by ``controller.load_timeout_s``) before it is closed."""

    def _open(self) -> None:
        generation = self.dialer.generation
        creds = self.dialer.credentials() if self.dialer.secure else None  # TlsFilesError: unusable files
        self.client = triton_aio.InferenceServerClient(url=self.address, creds=creds)
        self._generation = generation

    def _triton(self) -> triton_aio.InferenceServerClient:
        """The client, reopened first when the certificate files changed (TLS; gRPC fixes a channel's
        credentials when it opens): calls in flight finish on the old one, closed after RETIRE_GRACE_S.
        Renewed files that cannot be used yet (a key written before its certificate) leave the old
        client in use until they can."""
        if self.dialer.generation != self._generation:
            old = self.client
            try:
                self._open()
            except TlsFilesError as exc:
                log.warning("replica %s: keeping the current certificate: %s", self.address, exc)
                return old
            task = asyncio.get_running_loop().create_task(self._retire(old), name=f"retire client {self.address}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return self.client

    async def _retire(self, client: triton_aio.InferenceServerClient) -> None:
        try:
            await asyncio.sleep(self.RETIRE_GRACE_S)
        finally:
            await client.close()

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()  # each closes its client as it ends
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.client.close()

    async def is_live(self) -> bool:
        """Live, not "ready": with strict readiness a server reports not ready while it loads a model.

        With memory_kind gpu, the first time it answers live the GPUs are read for the budget
        (``budget_mb``); a failed reading is logged and the configured budget stays until one succeeds.
        """
        try:
            live = bool(await self._triton().is_server_live(client_timeout=WATCH_TIMEOUT_S))
        except Exception:  # tritonclient raises several types for a server that is down or too slow
            return False
        if live and self.gpu is not None and self.gpu.last is None:
            await self._gpu_step(self.gpu.read)
        return live

    async def _gpu_step(self, step: Callable[..., _T], *args: object) -> _T | None:
        """Run a blocking meter call in a thread; a reading that fails is logged (once per distinct
        reason) and gives None: the copy keeps its declared memory, the replica its last budget."""
        assert self.gpu is not None
        try:
            result = await asyncio.to_thread(step, *args)
        except GpuMemoryError as exc:
            if exc.message != self._gpu_problem:
                log.warning("replica %s: GPU memory not read: %s", self.address, exc.message)
                self._gpu_problem = exc.message
            return None
        self._gpu_problem = ""
        self.budget_mb = self.gpu.budget_mb(self.configured_budget_mb)
        return result

    async def loaded(self) -> dict[str, list[int]]:
        """Model name -> versions READY on this replica (from Triton's repository index)."""
        index = await self._triton().get_model_repository_index(as_json=True, client_timeout=WATCH_TIMEOUT_S)
        ready: dict[str, list[int]] = {}
        for entry in index.get("models", []):
            if entry.get("state") == "READY" and entry.get("version"):
                ready.setdefault(entry["name"], []).append(int(entry["version"]))
        return ready

    def _lay_out(self, name: str, spec: ModelSettings, uri: str, manifest: dict[str, dict[str, object]]) -> None:
        """Blocking: fetch each version into the cache and link it into this replica's repository."""
        model_dir = self.repository / backend_name(name, spec)
        wrapper = _wrapper_source()
        for version in spec.versions:
            cached = self.cache.fetch(name, uri, version, manifest)
            version_dir = model_dir / str(version)
            version_dir.mkdir(parents=True, exist_ok=True)
            _link_or_copy(cached, version_dir / "model.onnx")
            if self.backend == "python":
                (version_dir / "model.py").write_bytes(wrapper)

    async def load(self, name: str, spec: ModelSettings, uri: str, manifest: dict[str, dict[str, object]]) -> None:
        """Fetch the artifact (cached) and load the model with the registry's config.

        A load that fails leaves nothing behind: the model is unloaded and its
        directory removed, so the replica's repository index does not keep
        listing it (UNAVAILABLE with the old reason, or a half laid-out one).
        """
        try:
            await asyncio.to_thread(self._lay_out, name, spec, uri, manifest)
        except Exception:  # e.g. a download that fails its checksum
            await asyncio.to_thread(shutil.rmtree, self.repository / backend_name(name, spec), True)
            raise
        if self.gpu is not None:  # the "before" reading of this copy's growth
            await self._gpu_step(self.gpu.begin, name, spec.memory_mb)
        try:
            config = triton_config(name, spec, backend=self.backend, instance_kind=self.instance_kind)
            await self._triton().load_model(backend_name(name, spec), config=json.dumps(config))
        except InferenceServerException as exc:
            await self._clear(name, spec)
            raise ModelLoadFailed(f"Triton at {self.address} could not load {name!r}: {exc.message()}") from exc

    async def _clear(self, name: str, spec: ModelSettings) -> None:
        """Unload ``name`` and remove its directory from this replica's repository (after a failed load)."""
        await self.unload(name, spec)
        await asyncio.to_thread(shutil.rmtree, self.repository / backend_name(name, spec), True)

    async def unload(self, name: str, spec: ModelSettings) -> None:
        if self.gpu is not None:
            self.gpu.unloaded(name, spec.memory_mb)
        try:
            await self._triton().unload_model(backend_name(name, spec))
        except InferenceServerException as exc:
            log.warning("unloading %s from %s: %s", name, self.address, exc.message())

    async def warm_up(self, name: str, spec: ModelSettings) -> None:
        """One execution per version at the batcher's max batch size (ONNX Runtime keeps the
        arena of its largest batch, so this is the copy's working memory)."""
        shape = [spec.batching.max_batch_size, *input_dims(spec)]
        batch = np.zeros(shape, dtype=_NUMPY_DTYPES[spec.input.dtype])
        tensor = InferInput(spec.input.name, shape, spec.input.dtype)
        tensor.set_data_from_numpy(batch)
        for version in spec.versions:
            await self._triton().infer(backend_name(name, spec), [tensor], model_version=str(version))

    def measure_memory_mb(self, name: str, spec: ModelSettings) -> float | None:
        """What the copy of ``name`` holds here after its warm-up (blocking); None when not measured.

        host: the USS of its backend stubs plus their shm regions (None: none found). gpu: the growth
        since its load started (None: no "before" reading, or the reading now failed).
        """
        if self.gpu is not None:
            return self._measure_gpu_mb(name)
        marker = f"{self.repository / backend_name(name, spec)}/"
        total_kb = 0
        found = False
        for process in psutil.process_iter(["cmdline"]):  # a process gone meanwhile is skipped
            argv: list[str] = process.info["cmdline"] or []  # None: not ours to read, or a zombie
            if not argv or not argv[0].endswith("triton_python_backend_stub"):
                continue
            if not any(a.startswith(marker) for a in argv[1:2]):
                continue
            try:
                uss_bytes = process.memory_full_info().uss  # its private pages (Private_Clean + Private_Dirty)
            except psutil.Error:
                continue  # the process went away while being read
            total_kb += uss_bytes // 1024 + _shm_kb(argv)
            found = True
        return total_kb / 1024 if found else None

    def _measure_gpu_mb(self, name: str) -> float | None:
        assert self.gpu is not None
        try:
            grown = self.gpu.end(name)
        except GpuMemoryError as exc:
            log.warning("replica %s: GPU memory of %s not measured: %s", self.address, name, exc.message)
            return None
        self.budget_mb = self.gpu.budget_mb(self.configured_budget_mb)
        return grown


def _shm_kb(argv: list[str]) -> int:
    for arg in argv:
        if arg.startswith("triton_python_backend_shm_region"):
            try:
                return Path("/dev/shm", arg).stat().st_size // PAGE_KB
            except OSError:
                return 0
    return 0
