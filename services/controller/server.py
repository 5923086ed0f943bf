"""gRPC layer of the controller: the Controller service over the core.

Mutating calls (Deploy, Undeploy, CreateKey, RevokeKey) check the admin credential first
(``flotilla.common.admin``); the read-only ones and the mesh's own stay open: ListModels, GetModel,
ListKeys, WatchFleet, ShardHeartbeat, ReportKeyUse (last-use times only), GetModelStatistics and
EnsureLoaded (the preprocess workers' cold start: it loads a registered model, as any request for it
would).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from flotilla.api.v1 import controller_pb2, controller_pb2_grpc
from flotilla.common.admin import AdminGate, admin_gate
from flotilla.common.fleet import key_to_pb
from flotilla.common.interceptors import UNKNOWN_MODEL
from flotilla.common.object_store import ObjectStore
from flotilla.common.request_totals import RequestTotals
from flotilla.common.server import ServiceServer, serve_until_signal
from flotilla.common.tls import PLAINTEXT, Dialer, peer_common_names
from flotilla.common.wire import CONTROLLER_SERVICE
from flotilla.config import FlotillaSettings
from flotilla.errors import InvalidArgument
from flotilla.services.controller.artifacts import ArtifactCache, ArtifactStore
from flotilla.services.controller.controller import Controller, settle_heap
from flotilla.services.controller.gpu_memory import TritonGpuMetrics
from flotilla.services.controller.registry import ModelRecord, ObjectStoreRecords
from flotilla.services.controller.replicas import TritonReplica
from flotilla.services.controller.shards import QueueCounts

log = logging.getLogger(__name__)

USAGE_TIMEOUT_S = 1.0


def statistics_to_pb(controller: Controller, model: str) -> controller_pb2.ModelRequestStatistics:
    last_used = controller.shards.statistics.last_arrival_s(model)
    return controller_pb2.ModelRequestStatistics(
        name=model, **controller.shards.statistics.totals(model).pb_fields(),
        last_used_unix_s=0.0 if last_used is None else controller.to_unix_s(last_used),
    )


def status_to_pb(controller: Controller, record: ModelRecord, *, events: bool = True) -> controller_pb2.ModelStatus:
    """A model's status; the fleet's leave ``events`` out (an operator's GetModel has them)."""
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
        batchers=controller.shards.serving(record.name),
        memory_mb=record.memory_mb,
        memory_measured=record.measured_memory_mb is not None,
        events=[controller_pb2.Event(unix_s=e.unix_s, kind=e.kind, message=e.message) for e in record.events]
        if events else [],
        queue_wait_ms=wait_ms or 0.0,
        last_used_unix_s=0.0 if last_used is None else controller.to_unix_s(last_used),
        default_version=record.spec.served_version,
    )


def replica_to_pb(controller: Controller, address: str) -> controller_pb2.Replica:
    r = controller.replicas[address]
    return controller_pb2.Replica(
        address=r.address, budget_mb=r.budget_mb, used_mb=r.used_mb, healthy=r.healthy,
        http_address=getattr(controller.agents[r.address], "http_address", ""),
    )


def shard_to_pb(controller: Controller, address: str) -> controller_pb2.Shard:
    shard = controller.shards.shards[address]
    return controller_pb2.Shard(
        address=address, dedicated_model=shard.dedicated_model, models=len(shard.models),
        cpu_cores=shard.cpu_cores, requests_per_s=shard.requests_per_s,
    )


def fleet_to_pb(controller: Controller) -> controller_pb2.Fleet:
    """The whole fleet (a watch's first message)."""
    return controller_pb2.Fleet(
        generation=controller.generation,
        models=[status_to_pb(controller, r, events=False) for r in controller.committed()],
        replicas=[replica_to_pb(controller, a) for a in controller.replicas],
        shards=[shard_to_pb(controller, a) for a in controller.shards.shards],
        keys=[key_to_pb(k) for k in controller.keys.listed()],
    )


def fleet_since(controller: Controller, generation: int) -> controller_pb2.Fleet:
    """What a watcher that holds ``generation`` needs to hold the fleet now: the changes (their size,
    not the fleet's), or the whole fleet when the controller no longer knows them."""
    change = controller.changes_since(generation)
    if change is None or change.models is None:
        return fleet_to_pb(controller)
    models, removed = [], []
    for name in sorted(change.models):
        record = controller.records.get(name)
        if record is not None and record.committed:
            models.append(status_to_pb(controller, record, events=False))
        else:
            removed.append(name)
    known = controller.shards.shards
    return controller_pb2.Fleet(
        generation=controller.generation,
        delta=True,
        models=models,
        removed_models=removed,
        replicas=[replica_to_pb(controller, a) for a in sorted(change.replicas) if a in controller.replicas],
        shards=[shard_to_pb(controller, a) for a in sorted(change.shards) if a in known],
        removed_shards=[a for a in sorted(change.shards) if a not in known],
        keys=[key_to_pb(controller.keys.records[n]) for n in sorted(change.keys) if n in controller.keys.records],
        removed_keys=[n for n in sorted(change.keys) if n not in controller.keys.records],
    )


class FleetFeed:
    """Builds WatchFleet messages once per (from, to) generation, however many services watch."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._cached: dict[tuple[int, int], controller_pb2.Fleet] = {}

    def message(self, since: int | None) -> controller_pb2.Fleet:
        """The whole fleet when ``since`` is None (a new watcher), else the changes after ``since``."""
        key = (-1 if since is None else since, self.controller.generation)
        message = self._cached.get(key)
        if message is None:
            if any(k[1] != self.controller.generation for k in self._cached):
                self._cached.clear()  # only the newest generation's messages are asked for again
            message = fleet_to_pb(self.controller) if since is None else fleet_since(self.controller, since)
            self._cached[key] = message
        return message


class ControllerServicer(controller_pb2_grpc.ControllerServicer):
    def __init__(self, controller: Controller, admin: AdminGate) -> None:
        self.controller = controller
        self.admin = admin
        self.feed = FleetFeed(controller)

    def _admin(self, context: grpc.aio.ServicerContext[Any, Any], action: str) -> None:
        self.admin.check(context.invocation_metadata() or (), action, peer_common_names(context))

    async def Deploy(
        self, request: controller_pb2.DeployRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.ModelStatus:
        self._admin(context, "Deploy")
        record = await self.controller.deploy(request.name, request.spec_json, replace=request.replace)
        return status_to_pb(self.controller, record)

    async def Undeploy(
        self, request: controller_pb2.UndeployRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.UndeployResponse:
        self._admin(context, "Undeploy")
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

    async def GetModelStatistics(
        self, request: controller_pb2.GetModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.ModelStatisticsList:
        records = [self.controller.record(request.name)] if request.name else self.controller.committed()
        return controller_pb2.ModelStatisticsList(
            models=[statistics_to_pb(self.controller, r.name) for r in sorted(records, key=lambda r: r.name)]
        )

    async def EnsureLoaded(
        self, request: controller_pb2.EnsureLoadedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.ModelStatus:
        record = await self.controller.ensure_loaded(request.name)
        return status_to_pb(self.controller, record)

    async def ShardHeartbeat(
        self, request: controller_pb2.ShardHeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.ShardHeartbeatResponse:
        if not request.address:
            raise InvalidArgument("ShardHeartbeat needs the shard's address (host:port routers reach it at)")
        now = self.controller.clock.now()
        counters = {
            c.model: QueueCounts(c.arrivals_total, c.dispatched_total, c.queue_wait_s_total, c.queue_depth,
                                 c.inflight_batches, now - c.idle_s if c.arrivals_total else None)
            for c in request.counters
        }
        reply = self.controller.shard_heartbeat(
            request.address, dedicated_model=request.dedicated_model, counters=counters,
            cpu_seconds_total=request.cpu_seconds_total, assignment=request.assignment, started=request.started,
            requests={c.model: RequestTotals.from_pb(c) for c in request.counters},
        )
        if not reply.changed:
            # Held until the shard's models change or one interval passes; then it calls again at once.
            reply = await self.controller.shard_wait(request.address, request.assignment)
        return controller_pb2.ShardHeartbeatResponse(
            assignment=reply.assignment, changed=reply.changed, interval_s=reply.interval_s,
            removed_models=reply.removed, full=reply.full,
            models=[controller_pb2.ShardModel(name=name, spec_json=spec.model_dump_json()) for name, spec in reply.models],
        )

    async def WatchFleet(
        self, request: controller_pb2.WatchFleetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[controller_pb2.Fleet]:
        """The whole fleet, then after every change what changed since the last message this watcher got."""
        sent: int | None = None
        async for _ in self.controller.watch():
            message = self.feed.message(sent)
            sent = message.generation
            yield message

    async def CreateKey(
        self, request: controller_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.CreateKeyResponse:
        self._admin(context, "CreateKey")
        record, token = await self.controller.create_key(
            request.name, list(request.models), rate_per_s=request.rate_per_s, burst=request.burst,
            expires_unix_s=request.expires_unix_s,
        )
        return controller_pb2.CreateKeyResponse(key=key_to_pb(record, secret_parts=False), token=token)

    async def RevokeKey(
        self, request: controller_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.RevokeKeyResponse:
        self._admin(context, "RevokeKey")
        await self.controller.revoke_key(request.name)
        return controller_pb2.RevokeKeyResponse()

    async def ListKeys(
        self, request: controller_pb2.ListKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.ListKeysResponse:
        return controller_pb2.ListKeysResponse(
            keys=[key_to_pb(k, secret_parts=False) for k in self.controller.keys.listed()]
        )

    async def ReportKeyUse(
        self, request: controller_pb2.ReportKeyUseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.ReportKeyUseResponse:
        await self.controller.key_used({u.name: u.last_used_unix_s for u in request.uses})
        return controller_pb2.ReportKeyUseResponse()


def build_controller(settings: FlotillaSettings) -> Controller:
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
    # With TLS to Triton its HTTP endpoints (no TLS there) are not passed on: the workers use gRPC.
    triton_tls = settings.tls.enabled and settings.tls.triton
    http = [""] * len(settings.endpoints.triton)
    if settings.endpoints.triton_http and not triton_tls:
        http = settings.endpoints.triton_http
    if ctl.memory_kind == "gpu" and not settings.endpoints.triton_metrics:
        raise SystemExit("controller: controller.memory_kind gpu needs endpoints.triton_metrics (each Triton "
                         "replica's metrics host:port, in the order of endpoints.triton)")
    metrics_at = settings.endpoints.triton_metrics or [""] * len(settings.endpoints.triton)
    # Triton's gRPC endpoints: mutual TLS with this process's certificate when they serve it (tls.triton).
    triton_dialer = Dialer(settings.tls) if triton_tls else PLAINTEXT
    agents = [
        TritonReplica(
            address, ctl.budget_mb(i), Path(d) / "models", ArtifactCache(Path(d) / "cache", artifacts),
            backend=ctl.triton_backend, instance_kind=ctl.instance_kind, http_address=http[i],
            memory_kind=ctl.memory_kind,
            gpu_memory=TritonGpuMetrics(metrics_at[i]) if ctl.memory_kind == "gpu" else None,
            dialer=triton_dialer,
        )
        for i, (address, d) in enumerate(zip(settings.endpoints.triton, dirs, strict=True))
    ]
    records = ObjectStoreRecords(store_for(ctl.artifact_bucket), ctl.registry_prefix)
    if ctl.keys_prefix.startswith(ctl.registry_prefix):
        raise SystemExit("controller: controller.keys_prefix must not lie under controller.registry_prefix "
                         "(model records would be read as keys)")
    keys = ObjectStoreRecords(store_for(ctl.artifact_bucket), ctl.keys_prefix)
    configured = settings.models if ctl.deploy_configured_models else None
    return Controller(ctl, agents, artifacts, records, configured=configured, keys=keys)


async def serve(settings: FlotillaSettings, port: int) -> None:
    """Run the controller until SIGTERM."""
    if not settings.endpoints.triton:
        raise SystemExit("controller: endpoints.triton is empty; configure at least one Triton replica")
    controller = build_controller(settings)
    await controller.start()
    settle_heap()
    server = ServiceServer(
        "controller", [CONTROLLER_SERVICE], grace_s=settings.shutdown_grace_s, tier="controller",
        # Deploy names new models: registered ones are labels, the rest one value.
        model_label=lambda name: name if name in controller.records else UNKNOWN_MODEL, tls=settings.tls,
    )
    admin = admin_gate(settings)
    if not settings.controller.admin_keys and not settings.tls.enabled:
        log.warning("controller: no admin key (controller.admin_keys); Deploy, Undeploy and key changes "
                    "will be refused")
    controller_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(controller, admin), server.server)

    async def cleanup() -> None:
        await controller.stop()

    await serve_until_signal(server, settings.host, port, on_stop=cleanup)
