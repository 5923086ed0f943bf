"""gRPC layer of the controller: the Controller service over the core."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from flotilla.api.v1 import batcher_pb2, batcher_pb2_grpc, controller_pb2, controller_pb2_grpc
from flotilla.common.addresses import join_address, split_target
from flotilla.common.interceptors import UNKNOWN_MODEL
from flotilla.common.object_store import ObjectStore
from flotilla.common.peer import GrpcPeer
from flotilla.common.server import ServiceServer, serve_until_signal
from flotilla.common.wire import CONTROLLER_SERVICE
from flotilla.config import FlotillaSettings
from flotilla.pool.discovery import resolve_host
from flotilla.services.controller.artifacts import ArtifactCache, ArtifactStore
from flotilla.services.controller.controller import BatcherCounters, Controller
from flotilla.services.controller.registry import ModelRecord, ObjectStoreRecords
from flotilla.services.controller.replicas import TritonReplica

log = logging.getLogger(__name__)

USAGE_TIMEOUT_S = 1.0


def status_to_pb(controller: Controller, record: ModelRecord) -> controller_pb2.ModelStatus:
    copies = []
    for address, replica in controller.replicas.items():
        copy = replica.copies.get(record.name)
        if copy is None:
            continue
        state = copy.state if replica.healthy else "unreachable"
        copies.append(
            controller_pb2.Copy(
                replica=address,
                state=state,
                versions=record.spec.versions,
                memory_mb=copy.memory_mb,
            )
        )
    last_used = controller.last_used_s(record.name)
    wait_ms = controller.queue_wait_ms(record.name)
    return controller_pb2.ModelStatus(
        name=record.name,
        spec_json=record.spec.model_dump_json(),
        conditions=[
            controller_pb2.Condition(
                type=c.type,
                status=c.status,
                reason=c.reason,
                message=c.message,
                last_transition_unix_s=c.last_transition_unix_s,
                replica=c.replica,
            )
            for c in sorted(record.conditions.values(), key=lambda c: (c.type, c.replica))
        ],
        copies=copies,
        batchers=record.batchers,
        memory_mb=record.memory_mb,
        memory_measured=record.measured_memory_mb is not None,
        events=[controller_pb2.Event(unix_s=e.unix_s, kind=e.kind, message=e.message) for e in record.events],
        queue_wait_ms=wait_ms or 0.0,
        last_used_unix_s=0.0 if last_used is None else controller.to_unix_s(last_used),
        default_version=record.spec.served_version,
    )


def fleet_to_pb(controller: Controller) -> controller_pb2.Fleet:
    return controller_pb2.Fleet(
        generation=controller.generation,
        models=[status_to_pb(controller, r) for r in controller.committed()],
        replicas=[
            controller_pb2.Replica(
                address=r.address, budget_mb=r.budget_mb, used_mb=r.used_mb, healthy=r.healthy,
                http_address=getattr(controller.agents[r.address], "http_address", ""),
            )
            for r in controller.replicas.values()
        ],
    )


class ControllerServicer(controller_pb2_grpc.ControllerServicer):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._snapshot: controller_pb2.Fleet | None = None

    async def Deploy(
        self, request: controller_pb2.DeployRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.ModelStatus:
        record = await self.controller.deploy(request.name, request.spec_json, replace=request.replace)
        return status_to_pb(self.controller, record)

    async def Undeploy(
        self, request: controller_pb2.UndeployRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.UndeployResponse:
        await self.controller.undeploy(request.name)
        return controller_pb2.UndeployResponse()

    async def ListModels(
        self, request: controller_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.ListModelsResponse:
        return controller_pb2.ListModelsResponse(
            models=[status_to_pb(self.controller, r) for r in sorted(self.controller.committed(), key=lambda r: r.name)]
        )

    async def GetModel(
        self, request: controller_pb2.GetModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.ModelStatus:
        return status_to_pb(self.controller, self.controller.record(request.name))

    async def EnsureLoaded(
        self, request: controller_pb2.EnsureLoadedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.ModelStatus:
        record = await self.controller.ensure_loaded(request.name)
        return status_to_pb(self.controller, record)

    async def RegisterBatcher(
        self, request: controller_pb2.RegisterBatcherRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.RegisterBatcherResponse:
        record = self.controller.register_batcher(request.model_name, request.address)
        return controller_pb2.RegisterBatcherResponse(spec_json=record.spec.model_dump_json())

    async def WatchFleet(
        self, request: controller_pb2.WatchFleetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[controller_pb2.Fleet]:
        async for generation in self.controller.watch():
            yield self._fleet(generation)

    def _fleet(self, generation: int) -> controller_pb2.Fleet:
        """One snapshot per generation, however many services watch (router, workers, the stack)."""
        if self._snapshot is None or self._snapshot.generation != generation:
            self._snapshot = fleet_to_pb(self.controller)
        return self._snapshot


class BatcherUsage:
    """Reads and sums the cumulative counters of a model's batchers.

    With ``resolve`` (Kubernetes: a registered address is a headless Service
    name) every pod behind each address is read, not whichever one a
    connection lands on.
    """

    def __init__(self, *, resolve: bool = False) -> None:
        self.resolve = resolve
        self._peers: dict[str, GrpcPeer[batcher_pb2_grpc.BatcherAdminStub]] = {}

    async def _expand(self, addresses: list[str]) -> list[str]:
        if not self.resolve:
            return addresses
        expanded: list[str] = []
        for address in addresses:
            host, port = split_target(address)
            try:
                expanded += [join_address(ip, port) for ip in sorted(set(await resolve_host(host, port)))]
            except OSError:
                expanded.append(address)  # unresolvable now: read it as named
        return expanded

    async def __call__(self, model: str, addresses: list[str]) -> BatcherCounters | None:
        replies = await asyncio.gather(*(self._read(a) for a in await self._expand(addresses)))
        stats = [r for r in replies if r is not None]
        if not stats:
            return None
        return BatcherCounters(
            arrivals_total=sum(s.total_arrivals for s in stats),
            dispatched_total=sum(s.total_dispatched for s in stats),
            queue_wait_s_total=sum(s.total_queue_wait_s for s in stats),
            queue_depth=sum(s.queue_depth for s in stats),
            inflight_batches=sum(s.inflight_batches for s in stats),
        )

    async def _read(self, address: str) -> batcher_pb2.BatcherStats | None:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = GrpcPeer(address, batcher_pb2_grpc.BatcherAdminStub)
        assert peer.stub is not None
        try:
            request = batcher_pb2.GetStatsRequest()
            stats: batcher_pb2.BatcherStats = await peer.stub.GetStats(request, timeout=USAGE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return None  # a batcher restarting; the next poll reads it
        return stats

    async def close(self) -> None:
        for peer in self._peers.values():
            await peer.close()


def build_controller(settings: FlotillaSettings, usage: BatcherUsage | None = None) -> Controller:
    s3 = settings.s3
    ctl = settings.controller

    def store_for(bucket: str) -> ObjectStore:
        return ObjectStore(s3.model_copy(update={"bucket": bucket}), timeout_s=30.0)

    artifacts = ArtifactStore(store_for)
    dirs = ctl.replica_dirs or [settings.run_dir / f"triton-{i}" for i in range(len(settings.endpoints.triton))]
    if len(dirs) != len(settings.endpoints.triton):
        raise SystemExit(
            f"controller: {len(settings.endpoints.triton)} Triton endpoints but {len(dirs)} controller.replica_dirs"
        )
    http = settings.endpoints.triton_http or [""] * len(settings.endpoints.triton)
    agents = [
        TritonReplica(
            address, ctl.budget_mb(i), Path(d) / "models", ArtifactCache(Path(d) / "cache", artifacts),
            backend=ctl.triton_backend, instance_kind=ctl.instance_kind, http_address=http[i],
        )
        for i, (address, d) in enumerate(zip(settings.endpoints.triton, dirs, strict=True))
    ]
    records = ObjectStoreRecords(store_for(ctl.artifact_bucket), ctl.registry_prefix)
    configured = settings.models if ctl.deploy_configured_models else None
    return Controller(ctl, agents, artifacts, records, usage=usage, configured=configured)


async def serve(settings: FlotillaSettings, port: int) -> None:
    """Run the controller until SIGTERM."""
    if not settings.endpoints.triton:
        raise SystemExit("controller: endpoints.triton is empty; configure at least one Triton replica")
    usage = BatcherUsage(resolve=settings.pools.dns_refresh_interval_s > 0)
    controller = build_controller(settings, usage)
    await controller.start()
    server = ServiceServer(
        "controller", [CONTROLLER_SERVICE], grace_s=settings.shutdown_grace_s, tier="controller",
        # Deploy names new models: registered ones are labels, the rest one value.
        model_label=lambda name: name if name in controller.records else UNKNOWN_MODEL,
    )
    controller_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(controller), server.server)

    async def cleanup() -> None:
        await controller.stop()
        await usage.close()

    await serve_until_signal(server, settings.host, port, on_stop=cleanup)
