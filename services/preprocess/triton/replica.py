"""What ``TritonBackend`` asks of one Triton replica, whichever protocol reaches it.

A replica is reached over KServe v2 HTTP (``http_replica``: the worker's own
HTTP/1.1 client, ~4x less client CPU per batch than a grpc.aio call) when the
controller knows its HTTP endpoint, over KServe v2 gRPC (``grpc_replica``)
otherwise. Both take the same ``InferCall``, answer the output tensor, and
fail with ``ReplicaCallError`` in gRPC's status codes, so retries, ejection
and the error a caller sees do not depend on the protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from numpy.typing import NDArray

from flotilla.errors import Code
from flotilla.services.preprocess.triton.shm import Region, is_stale

log = logging.getLogger(__name__)

T = TypeVar("T")

REGISTER_TIMEOUT_S = 5.0
"""The longest a shared-memory control call (register, status, unregister) may take."""


class ReplicaCallError(Exception):
    """A call the replica answered with an error, or that could not reach it (UNAVAILABLE)."""

    def __init__(self, code: Code, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class InferCall:
    """One batch's inference request, encoded once per protocol and way of carrying the tensor
    however many replicas it is tried on."""

    model: str
    version: str
    """"" runs the replica's default version."""
    input_name: str
    batch: NDArray[Any]
    """C-contiguous."""
    output_name: str
    region: Region | None = None
    """The shared-memory region holding ``batch``, if it was copied into one."""
    _encoded: dict[tuple[str, bool], object] = field(default_factory=dict)

    def encoded(self, protocol: str, in_region: bool, build: Callable[[], T]) -> T:
        """``build()``'s result for this protocol and carriage, built on first use."""
        key = (protocol, in_region)
        if key not in self._encoded:
            self._encoded[key] = build()
        # One key is only ever built by one protocol's encoder: its value is of that build's type.
        return cast(T, self._encoded[key])


class Replica(Protocol):
    address: str
    """The replica's gRPC host:port: its name in placement, pools and metrics."""
    protocol: str
    """"http" or "grpc": how batches reach it."""
    shared_memory: bool
    """Batches go to it through the worker's shared-memory regions (it is on this host and can map them)."""

    @property
    def http_address(self) -> str | None:
        """The HTTP endpoint batches go to; None over gRPC."""
        ...

    async def holds(self, region: Region, timeout_s: float | None) -> bool:
        """Whether the replica has ``region`` registered, registering it now if not. A replica that
        cannot map it gets every batch inline from then on (False); one that is down or too slow to
        answer raises ReplicaCallError, as an inference call would."""
        ...

    async def infer(self, call: InferCall, in_region: bool, timeout_s: float | None) -> NDArray[Any] | None:
        """``call.output_name`` of the batch run on this replica (None when the answer lacks it), the
        tensor in ``call.region`` when ``in_region``, inline otherwise. Raises ReplicaCallError."""
        ...

    async def forget(self, region: Region) -> None:
        """Unregister ``region`` (best effort: the worker is stopping or the replica went away)."""
        ...

    async def close(self) -> None: ...


def lost_region(code: Code, details: str) -> bool:
    """The replica's answer to a request naming a region it has no registration of (it restarted)."""
    return code == Code.NOT_FOUND and "shared memory region" in details


def control_timeout_s(timeout_s: float | None) -> float:
    """A shared-memory control call's timeout: what is left of the batch's, at most REGISTER_TIMEOUT_S."""
    return min(timeout_s or REGISTER_TIMEOUT_S, REGISTER_TIMEOUT_S)


class SharedMemoryRegistrations:
    """A replica's registrations of the worker's shared-memory regions, whichever protocol
    carries the three control calls a subclass gives (``_register``, ``_registered_names``,
    ``_unregister``, each raising ReplicaCallError)."""

    def __init__(self, address: str, *, shared_memory: bool, shm_prefix_base: str | None) -> None:
        self.address = address
        self.shared_memory = shared_memory
        """Batches go to it through shared memory (the worker has regions, named ``<shm_prefix_base>
        <pid>-<n>``, and the replica is on this host and can map them)."""
        self.shm_prefix_base = shm_prefix_base or ""
        """Registrations under this prefix of a pid no longer running are a killed worker's: they are
        removed before this worker's first (Triton keeps their memory mapped)."""
        self._swept = False

    async def _register(self, region: Region, timeout_s: float) -> None:
        """Register ``region``; returns normally when it already is."""
        raise NotImplementedError

    async def _registered_names(self, timeout_s: float) -> list[str]:
        raise NotImplementedError

    async def _unregister(self, name: str, timeout_s: float) -> None:
        raise NotImplementedError

    async def holds(self, region: Region, timeout_s: float | None) -> bool:
        """See ``Replica.holds``."""
        if not self.shared_memory:
            return False
        if self.address in region.registered:
            return True
        if not self._swept:
            await self._sweep(timeout_s)
        try:
            await self._register(region, control_timeout_s(timeout_s))
        except ReplicaCallError as exc:
            if exc.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED):
                raise
            log.warning("Triton at %s cannot map shared memory (%s: %s); its batches go inline in the request",
                        self.address, exc.code.name, exc.details)
            self.shared_memory = False
            return False
        region.registered.add(self.address)
        return True

    async def _sweep(self, timeout_s: float | None) -> None:
        """Unregister the regions killed workers left registered (best effort, once)."""
        self._swept = True
        timeout = control_timeout_s(timeout_s)
        try:
            stale = [n for n in await self._registered_names(timeout) if is_stale(n, self.shm_prefix_base)]
            for name in stale:
                await self._unregister(name, timeout)
        except ReplicaCallError as exc:
            log.debug("sweeping stale shared-memory registrations on %s: %s", self.address, exc.details)
            return
        if stale:
            log.info("unregistered %d shared-memory regions of stopped workers from Triton at %s",
                     len(stale), self.address)

    async def forget(self, region: Region) -> None:
        """See ``Replica.forget``."""
        if self.address not in region.registered:
            return
        region.registered.discard(self.address)
        try:
            await self._unregister(region.name, 1.0)
        except ReplicaCallError as exc:
            log.debug("unregistering %s from %s: %s", region.name, self.address, exc.details)
