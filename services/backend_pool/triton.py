"""Triton Inference Server replicas behind EndpointPools, one pool per model.

Talks KServe v2 gRPC on a grpc.aio channel per replica, with tritonclient's
generated messages but not its client: the request is the small
ModelInferRequest header serialised once plus the batch's bytes appended as
``raw_input_contents`` straight from the numpy buffer (one copy, where
tritonclient's InferInput, the message and its serialisation make three),
and the output is read with ``np.frombuffer`` on ``raw_output_contents``.
gRPC status codes are turned into Flotilla errors here, at the boundary.

A replica on this host (a loopback address) gets the batch through system
shared memory instead when the worker has regions to give (``shm``): the
batch is copied once into a region registered with that replica, and the
request is only the header naming it. A replica that cannot map the region
(another host or container behind a loopback port) gets the bytes inline
from then on; one that lost the registration (it restarted) is registered
again and the call sent again.

Membership is placement: each model's pool holds exactly the replicas the
controller reports a ready copy on (``set_copies``), not whatever a probe
finds. A replica that answers NOT_FOUND is in transition (being unloaded or
restarted): the call is retried on another copy. A model with no copy at
all is a cold start: ``cold_start`` (the controller's EnsureLoaded) is
awaited once per burst, and the batch runs on the copy it loaded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from opentelemetry.trace import SpanKind
from tritonclient.grpc import service_pb2
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from flotilla.common import metrics, tracing
from flotilla.common.server import PEER_KEEPALIVE_S, PEER_KEEPALIVE_TIMEOUT_S, keepalive_options
from flotilla.config import BackendSettings, PoolSettings
from flotilla.errors import (
    BackendError,
    BackendUnavailable,
    Code,
    DeadlineExceeded,
    FlotillaError,
    NoHealthyEndpoint,
    ReplicaInTransition,
)
from flotilla.services.backend_pool.pool import Endpoint, EndpointPool, make_strategy
from flotilla.services.backend_pool.shm import Region, SharedMemoryRegions, is_stale
from flotilla.services.preprocess.backend import InferResult

log = logging.getLogger(__name__)

# model -> replica addresses holding a ready copy once it is loaded
ColdStart = Callable[[str], Awaitable[list[str]]]


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SHM_REGISTER = "/inference.GRPCInferenceService/SystemSharedMemoryRegister"
SHM_UNREGISTER = "/inference.GRPCInferenceService/SystemSharedMemoryUnregister"
SHM_STATUS = "/inference.GRPCInferenceService/SystemSharedMemoryStatus"
REGISTER_TIMEOUT_S = 5.0
MAX_MESSAGE_BYTES = 2**31 - 1
"""gRPC message limit both ways (tritonclient's): a batch of large FP32 images exceeds the 4 MiB default."""
# ModelInferRequest.raw_input_contents (field 7, length-delimited): its tag byte on the wire.
_RAW_INPUT_TAG = bytes([(service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number << 3) | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_infer_request(
    model: str, version: str, input_name: str, batch: np.ndarray, output_name: str
) -> bytes:
    """A serialised ModelInferRequest for one input tensor, its contents raw.

    The header (names, shape, datatype) is a small message; the tensor's
    bytes follow as field ``raw_input_contents``, joined straight from the
    array's buffer (protobuf parses concatenated fields as one message).
    """
    batch = np.ascontiguousarray(batch)
    header = service_pb2.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name=input_name, datatype=np_to_triton_dtype(batch.dtype), shape=batch.shape
            )
        ],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=output_name)],
    )
    data = memoryview(batch).cast("B")
    return b"".join((header.SerializeToString(), _RAW_INPUT_TAG, _varint(data.nbytes), data))


def encode_shm_infer_request(
    model: str, version: str, input_name: str, batch: np.ndarray, output_name: str, region: str
) -> bytes:
    """A serialised ModelInferRequest whose one input is ``batch``'s bytes at the start of the
    shared-memory ``region`` (Triton's system shared memory parameters), not in the message."""
    request = service_pb2.ModelInferRequest(
        model_name=model,
        model_version=version,
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=output_name)],
    )
    tensor = request.inputs.add(name=input_name, datatype=np_to_triton_dtype(batch.dtype), shape=batch.shape)
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = batch.nbytes
    return request.SerializeToString()


def lost_region(code: grpc.StatusCode, details: str) -> bool:
    """Triton's answer to a request naming a region it has no registration of (it restarted)."""
    return code == grpc.StatusCode.NOT_FOUND and "shared memory region" in details


def _control_timeout_s(timeout_s: float | None) -> float:
    """A shared-memory control call's timeout: what is left of the batch's, at most REGISTER_TIMEOUT_S."""
    return min(timeout_s or REGISTER_TIMEOUT_S, REGISTER_TIMEOUT_S)


def is_loopback(address: str) -> bool:
    """``host:port`` names this host (localhost or a loopback IP)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def decode_infer_response(response: service_pb2.ModelInferResponse, output_name: str) -> np.ndarray | None:
    """The named output of a ModelInferResponse as an array (a view of the message's bytes); None if absent."""
    for index, output in enumerate(response.outputs):
        if output.name != output_name:
            continue
        if output.datatype == "BYTES" or index >= len(response.raw_output_contents):
            return None  # never what a classifier returns; Triton's gRPC always sends raw contents
        flat = np.frombuffer(response.raw_output_contents[index], dtype=triton_to_np_dtype(output.datatype))
        return flat.reshape(tuple(output.shape))
    return None


def translate_triton_error(code: grpc.StatusCode, details: str, address: str, model: str) -> FlotillaError:
    """Map a failed ModelInfer call to the Flotilla error a caller can act on."""
    status = Code[code.name] if code.name in Code.__members__ else Code.UNKNOWN
    message = details or code.name
    if status == Code.UNAVAILABLE or "Socket closed" in message or "failed to connect" in message:
        return BackendUnavailable(f"Triton at {address} is unavailable: {message}")
    if status == Code.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"Triton at {address} did not answer before the deadline")
    if status == Code.NOT_FOUND:
        return ReplicaInTransition(f"model {model!r} is not loaded on Triton at {address}: {message}")
    return BackendError(f"Triton at {address} failed the batch for {model!r}: {message}")


class TritonReplica:
    """One replica's channel, its ModelInfer method on pre-serialised requests, and its
    registrations of the worker's shared-memory regions."""

    def __init__(self, address: str, *, shm_prefix_base: str | None = None) -> None:
        self.address = address
        self.shared_memory = shm_prefix_base is not None and is_loopback(address)
        """Batches go to it through shared memory (the worker has regions, named ``<shm_prefix_base>
        <pid>-<n>``, and the replica is on this host and can map them)."""
        self.shm_prefix_base = shm_prefix_base or ""
        """Registrations under this prefix of a pid no longer running are a killed worker's: they are
        removed before this worker's first (Triton keeps their memory mapped)."""
        self._swept = False
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # A replica that vanished without a reset fails its batches UNAVAILABLE (retried on
                # another copy) within seconds, not at their deadlines; Triton runs with TRITON_PING_ARGS.
                *keepalive_options(PEER_KEEPALIVE_S, PEER_KEEPALIVE_TIMEOUT_S),
            ],
        )
        # No request serialiser: the request arrives as bytes from encode_infer_request.
        self.model_infer = self.channel.unary_unary(
            MODEL_INFER, request_serializer=None, response_deserializer=service_pb2.ModelInferResponse.FromString
        )
        self._register = self.channel.unary_unary(
            SHM_REGISTER,
            request_serializer=service_pb2.SystemSharedMemoryRegisterRequest.SerializeToString,
            response_deserializer=service_pb2.SystemSharedMemoryRegisterResponse.FromString,
        )
        self._unregister = self.channel.unary_unary(
            SHM_UNREGISTER,
            request_serializer=service_pb2.SystemSharedMemoryUnregisterRequest.SerializeToString,
            response_deserializer=service_pb2.SystemSharedMemoryUnregisterResponse.FromString,
        )
        self._status = self.channel.unary_unary(
            SHM_STATUS,
            request_serializer=service_pb2.SystemSharedMemoryStatusRequest.SerializeToString,
            response_deserializer=service_pb2.SystemSharedMemoryStatusResponse.FromString,
        )

    async def holds(self, region: Region, timeout_s: float | None) -> bool:
        """Whether the replica has ``region`` registered, registering it now if not. A replica
        that cannot map it gets every batch inline from then on (False); one that is down or
        too slow to answer raises, as a ModelInfer would."""
        if not self.shared_memory:
            return False
        if self.address in region.registered:
            return True
        if not self._swept:
            await self._sweep(timeout_s)
        request = service_pb2.SystemSharedMemoryRegisterRequest(name=region.name, key=region.key, byte_size=region.nbytes)
        try:
            await self._register(request, timeout=_control_timeout_s(timeout_s))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:  # registered by this worker before it lost track
                region.registered.add(self.address)
                return True
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            log.warning(
                "Triton at %s cannot map shared memory (%s: %s); its batches go inline in the gRPC message",
                self.address, exc.code().name, exc.details(),
            )
            self.shared_memory = False
            return False
        region.registered.add(self.address)
        return True

    async def _sweep(self, timeout_s: float | None) -> None:
        """Unregister the regions killed workers left registered (best effort, once)."""
        self._swept = True
        timeout = _control_timeout_s(timeout_s)
        try:
            status = await self._status(service_pb2.SystemSharedMemoryStatusRequest(), timeout=timeout)
            stale = [name for name in status.regions if is_stale(name, self.shm_prefix_base)]
            for name in stale:
                await self._unregister(service_pb2.SystemSharedMemoryUnregisterRequest(name=name), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            log.debug("sweeping stale shared-memory registrations on %s: %s", self.address, exc.details())
            return
        if stale:
            log.info("unregistered %d shared-memory regions of stopped workers from Triton at %s",
                     len(stale), self.address)

    async def forget(self, region: Region) -> None:
        """Unregister ``region`` (best effort: the worker is stopping or the replica went away)."""
        if self.address not in region.registered:
            return
        region.registered.discard(self.address)
        try:
            await self._unregister(service_pb2.SystemSharedMemoryUnregisterRequest(name=region.name), timeout=1.0)
        except grpc.aio.AioRpcError as exc:
            log.debug("unregistering %s from %s: %s", region.name, self.address, exc.details())

    async def close(self) -> None:
        await self.channel.close()


class TritonBackend:
    """Runs batches on the Triton replicas that hold each model."""

    def __init__(
        self,
        settings: PoolSettings,
        *,
        cold_start: ColdStart | None = None,
        clock: Callable[[], float] = time.monotonic,
        shm: SharedMemoryRegions | None = None,
    ) -> None:
        self.settings = settings
        self.cold_start = cold_start
        self._clock = clock
        self.shm = shm
        """Regions for batches to replicas on this host; None sends every batch inline."""
        self._clients: dict[str, TritonReplica] = {}
        self.pools: dict[str, EndpointPool[TritonReplica]] = {}
        self._cold: dict[str, asyncio.Task[list[str]]] = {}

    def _client(self, address: str) -> TritonReplica:
        if address not in self._clients:
            self._clients[address] = TritonReplica(address, shm_prefix_base=self.shm.prefix_base if self.shm else None)
        return self._clients[address]

    def set_copies(self, model: str, addresses: list[str], backend: BackendSettings) -> None:
        """The replicas holding a ready copy of ``model`` (its pool becomes exactly these)."""
        pool = self.pools.get(model)
        capacity = backend.instance_groups * backend.predict_concurrency
        if pool is None:
            pool = EndpointPool(
                f"Triton[{model}]", {},
                strategy=make_strategy(backend.strategy or self.settings.strategy),
                max_attempts=max(self.settings.max_attempts, 2),
                eject_after_failures=self.settings.eject_after_failures,
                eject_cooldown_s=self.settings.eject_cooldown_s,
                max_outstanding=capacity,
            )
            self.pools[model] = pool
        pool.max_outstanding = capacity
        if {e.address for e in pool.endpoints} != set(addresses):
            pool.set_endpoints({a: self._client(a) for a in addresses})

    def remove(self, model: str) -> None:
        pool = self.pools.pop(model, None)
        if pool is not None:
            pool.set_endpoints({})  # its clients are shared per replica and stay open

    async def _ensure_copy(self, model: str) -> None:
        """Wait for the controller to load a copy (one request per model at a time)."""
        if self.cold_start is None:
            raise NoHealthyEndpoint(f"model {model!r} has no loaded copy")
        task = self._cold.get(model)
        if task is None:
            task = asyncio.ensure_future(self.cold_start(model))
            self._cold[model] = task
            task.add_done_callback(lambda _: self._cold.pop(model, None))
        addresses = await asyncio.shield(task)
        pool = self.pools.get(model)
        if pool is not None and not pool.endpoints:
            pool.set_endpoints({a: self._client(a) for a in addresses})

    async def infer(
        self,
        model: str,
        input_name: str,
        batch: np.ndarray,
        output_name: str,
        *,
        version: int = 0,
        timeout_s: float | None = None,
    ) -> InferResult:
        """Run ``batch`` on one copy and return its ``output_name`` tensor."""
        pool = self.pools.get(model)
        if pool is None:
            self.set_copies(model, [], BackendSettings())
            pool = self.pools[model]
        deadline_s = None if timeout_s is None else self._clock() + timeout_s
        if not pool.endpoints:
            await self._within(self._ensure_copy(model), deadline_s, model)

        batch = np.ascontiguousarray(batch)
        batch_size = int(batch.shape[0])
        version_text = str(version) if version else ""
        inline: list[bytes] = []
        region = self._region_for(pool, batch)

        def request_for(in_region: bool) -> bytes:
            if in_region:
                assert region is not None
                return encode_shm_infer_request(model, version_text, input_name, batch, output_name, region.name)
            if not inline:  # built once, on the first replica that takes it inline
                inline.append(encode_infer_request(model, version_text, input_name, batch, output_name))
            return inline[0]

        async def on(endpoint: Endpoint[TritonReplica]) -> InferResult:
            replica = endpoint.client
            started_s = time.perf_counter()
            attributes = {"flotilla.model": model, "flotilla.replica": endpoint.address,
                          "flotilla.model_version": version, "flotilla.batch_size": batch_size}
            with tracing.span(f"triton {model}", kind=SpanKind.CLIENT, attributes=attributes):
                try:
                    reply, transfer = await self._send(replica, region, request_for, deadline_s)
                except grpc.aio.AioRpcError as exc:
                    raise translate_triton_error(exc.code(), exc.details() or "", endpoint.address, model) from exc
                finally:
                    metrics.BACKEND_SECONDS.labels(model, endpoint.address).observe(time.perf_counter() - started_s)
            metrics.BACKEND_BATCHES.labels(model, endpoint.address, transfer).inc()
            outputs = decode_infer_response(reply, output_name)
            if outputs is None:
                raise BackendError(f"Triton at {endpoint.address} returned no {output_name!r} output")
            return InferResult(outputs, endpoint.address)

        try:
            try:
                return await pool.call(on, deadline_s=deadline_s)
            except NoHealthyEndpoint:
                if self.cold_start is None or pool.endpoints:
                    raise
                # Every copy went away while the call waited (unloaded, scaled to zero): load one.
                await self._within(self._ensure_copy(model), deadline_s, model)
                return await pool.call(on, deadline_s=deadline_s)
        finally:
            if region is not None and self.shm is not None:
                self.shm.release(region)  # its call has ended: the next batch may overwrite it

    def _region_for(self, pool: EndpointPool[TritonReplica], batch: np.ndarray) -> Region | None:
        """A region holding ``batch`` if any of the model's replicas may take it from one."""
        if self.shm is None or not any(e.client.shared_memory for e in pool.endpoints):
            return None
        region = self.shm.acquire(batch.nbytes)
        if region is not None:
            region.write(memoryview(batch))
        return region

    async def _send(
        self,
        replica: TritonReplica,
        region: Region | None,
        request_for: Callable[[bool], bytes],
        deadline_s: float | None,
    ) -> tuple[service_pb2.ModelInferResponse, str]:
        """One ModelInfer on ``replica`` and how the batch went (``shm`` or ``inline``): through
        ``region`` where the replica holds it (or can register it now), inline otherwise. A replica
        that lost the region's registration (it restarted) is given it again and the batch sent
        again, once."""

        def remaining_s() -> float | None:
            return None if deadline_s is None else max(deadline_s - self._clock(), 0.001)

        retried = False
        while True:
            in_region = region is not None and await replica.holds(region, remaining_s())
            try:
                reply = await replica.model_infer(request_for(in_region), timeout=remaining_s(), metadata=tracing.inject())
                return reply, "shm" if in_region else "inline"
            except grpc.aio.AioRpcError as exc:
                if retried or not in_region or not lost_region(exc.code(), exc.details() or ""):
                    raise
            assert region is not None
            log.info("Triton at %s lost shared-memory region %s: registering it again", replica.address, region.name)
            region.registered.discard(replica.address)
            retried = True

    async def _within(self, wait: Awaitable[None], deadline_s: float | None, model: str) -> None:
        if deadline_s is None:
            await wait
            return
        try:
            await asyncio.wait_for(wait, max(deadline_s - self._clock(), 0.0))
        except TimeoutError:
            raise DeadlineExceeded(f"deadline passed while model {model!r} was loading (cold start)") from None

    async def close(self) -> None:
        for task in self._cold.values():
            task.cancel()
        if self.shm is not None:
            await asyncio.gather(
                *(client.forget(region) for region in self.shm.regions for client in self._clients.values())
            )
            self.shm.close()
        for client in self._clients.values():
            await client.close()
