"""Following the controller: every data-plane service learns the fleet here.

``FleetWatcher`` holds the controller's WatchFleet stream open. The stream's
first message is the whole fleet (every registered model: spec, ready
copies, batching shards; replicas; shards; API key records), each later one only what
changed; ``FleetState`` applies them in order and says what changed
(``FleetChange``), so a watcher's work per change is the change's size, not
the fleet's. When the controller is away (restarting) the last state stays
in force and the watcher reconnects with backoff, so the data plane keeps
serving what it knew; the reconnected stream starts with a whole fleet
again, and models the watcher held that it lacks are reported removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from flotilla.api.v1 import controller_pb2, controller_pb2_grpc
from flotilla.common.apikeys import KeyRecord
from flotilla.common.status import error_from_rpc
from flotilla.common.tasks import cancel_and_wait
from flotilla.common.tls import PLAINTEXT, Dialer, RenewingChannel
from flotilla.common.wire import CONTROL_CHANNEL_OPTIONS
from flotilla.config import ModelSettings

log = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 2.0



@dataclass(frozen=True)
class FleetChange:
    """What one WatchFleet message changed."""

    generation: int
    full: bool
    """The message was a whole fleet (a watch's first)."""
    changed: list[str]
    """Models added or changed (on a whole fleet: every model in it)."""
    removed: list[str]
    """Models gone (on a whole fleet: those held before that it lacks)."""
    keys_changed: list[str] = field(default_factory=list)
    """API keys added or changed, by name (on a whole fleet: every key in it)."""
    keys_removed: list[str] = field(default_factory=list)
    """API keys revoked (on a whole fleet: those held before that it lacks)."""


class FleetState:
    """The whole fleet, kept by applying WatchFleet messages in order."""

    def __init__(self) -> None:
        self.generation = 0
        self.models: dict[str, controller_pb2.ModelStatus] = {}
        self.replicas: dict[str, controller_pb2.Replica] = {}
        self.shards: dict[str, controller_pb2.Shard] = {}
        self.keys: dict[str, controller_pb2.ApiKey] = {}
        """API key records by name (hashes, never keys)."""

    def apply(self, message: controller_pb2.Fleet) -> FleetChange:
        changed = [m.name for m in message.models]
        keys_changed = [k.name for k in message.keys]
        if message.delta:
            removed = [name for name in message.removed_models if name in self.models]
            keys_removed = [name for name in message.removed_keys if name in self.keys]
            for name in message.removed_models:
                self.models.pop(name, None)
            for address in message.removed_shards:
                self.shards.pop(address, None)
            for name in message.removed_keys:
                self.keys.pop(name, None)
        else:
            removed = [name for name in self.models if name not in set(changed)]
            keys_removed = [name for name in self.keys if name not in set(keys_changed)]
            self.models, self.replicas, self.shards, self.keys = {}, {}, {}, {}
        for key in message.keys:
            self.keys[key.name] = key
        for status in message.models:
            self.models[status.name] = status
        for replica in message.replicas:
            self.replicas[replica.address] = replica
        for shard in message.shards:
            self.shards[shard.address] = shard
        self.generation = message.generation
        return FleetChange(message.generation, not message.delta, changed, removed, keys_changed, keys_removed)


OnFleet = Callable[[FleetState, FleetChange], Awaitable[None]]


def spec_of(status: controller_pb2.ModelStatus) -> ModelSettings:
    return ModelSettings.model_validate(json.loads(status.spec_json))


def key_to_pb(record: KeyRecord, *, secret_parts: bool = True) -> controller_pb2.ApiKey:
    """A key's record as the fleet carries it; without ``secret_parts`` (ListKeys) no salt or hash."""
    return controller_pb2.ApiKey(
        name=record.name, id=record.id, salt=record.salt if secret_parts else b"",
        hash=record.hash if secret_parts else b"", models=record.models, rate_per_s=record.rate_per_s,
        burst=record.burst, expires_unix_s=record.expires_unix_s, created_unix_s=record.created_unix_s,
        last_used_unix_s=record.last_used_unix_s,
    )


def key_from_pb(key: controller_pb2.ApiKey) -> KeyRecord:
    return KeyRecord(
        name=key.name, id=key.id, salt=key.salt, hash=key.hash, models=tuple(key.models),
        rate_per_s=key.rate_per_s, burst=key.burst, expires_unix_s=key.expires_unix_s,
        created_unix_s=key.created_unix_s, last_used_unix_s=key.last_used_unix_s,
    )


async def controller_call(rpc: Callable[..., Awaitable[Any]], request: Any, timeout_s: float | None = None) -> Any:
    """A unary call to the controller on behalf of a caller: its answer, or its failure as a FlotillaError
    marked as the controller's (a status the controller relays from below keeps its origin)."""
    try:
        return await rpc(request, timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc, "controller").from_below("controller") from exc


def ready_replicas(status: controller_pb2.ModelStatus) -> list[str]:
    """Replicas holding a ready copy: the only ones that get the model's batches."""
    return [c.replica for c in status.copies if c.state == "ready"]


class FleetWatcher:
    def __init__(self, address: str, on_fleet: OnFleet, *, name: str, dialer: Dialer = PLAINTEXT) -> None:
        self.address = address
        self.on_fleet = on_fleet
        self.name = name
        self.state = FleetState()
        self._first = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel = RenewingChannel(dialer, address, CONTROL_CHANNEL_OPTIONS)
        self.stub = controller_pb2_grpc.ControllerStub(self._channel.channel)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"fleet:{self.name}")

    @property
    def has_fleet(self) -> bool:
        """A first snapshot arrived: the watcher holds the whole fleet (perhaps a stale one, while the
        controller is away)."""
        return self._first.is_set()

    async def wait_first(self, timeout_s: float) -> bool:
        """True once a first snapshot arrived (within ``timeout_s``)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first.wait(), timeout_s)
        return self._first.is_set()

    async def report_key_use(self, uses: dict[str, float], timeout_s: float = 2.0) -> None:
        """Tell the controller when keys were last used (name -> unix seconds); a failure is logged
        and the report dropped (last use is approximate)."""
        request = controller_pb2.ReportKeyUseRequest(
            uses=[controller_pb2.KeyUse(name=name, last_used_unix_s=at) for name, at in uses.items()]
        )
        try:
            await self.stub.ReportKeyUse(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.debug("%s: key use report failed: %s", self.name, exc.code().name)

    async def ensure_loaded(self, model: str, timeout_s: float | None) -> controller_pb2.ModelStatus:
        """Load registered ``model`` on a replica unless a copy is ready, and its status once one is (the
        controller's EnsureLoaded, as a cold start does); the controller's failure as a FlotillaError."""
        status: controller_pb2.ModelStatus = await controller_call(
            self.stub.EnsureLoaded, controller_pb2.EnsureLoadedRequest(name=model), timeout_s
        )
        return status

    async def model_statistics(
        self, model: str, timeout_s: float | None
    ) -> list[controller_pb2.ModelRequestStatistics]:
        """The request counters of ``model`` ("": every registered model) over the fleet (the controller's
        GetModelStatistics); the controller's failure as a FlotillaError."""
        answer: controller_pb2.ModelStatisticsList = await controller_call(
            self.stub.GetModelStatistics, controller_pb2.GetModelStatisticsRequest(name=model), timeout_s
        )
        return list(answer.models)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self._channel.close()

    async def _run(self) -> None:
        delay_s = RETRY_INITIAL_S
        connected_before = False
        while True:
            if self._channel.renew():  # certificate files renewed (TLS): a new channel with them
                self.stub = controller_pb2_grpc.ControllerStub(self._channel.channel)
            try:
                async for fleet in self.stub.WatchFleet(controller_pb2.WatchFleetRequest()):
                    if not connected_before or delay_s > RETRY_INITIAL_S:
                        log.info("%s: following the controller at %s (generation %d)",
                                 self.name, self.address, fleet.generation)
                    connected_before, delay_s = True, RETRY_INITIAL_S
                    change = self.state.apply(fleet)
                    try:
                        await self.on_fleet(self.state, change)
                    except Exception:
                        log.exception("%s: applying fleet generation %d failed", self.name, fleet.generation)
                    self._first.set()
            except grpc.aio.AioRpcError as exc:
                if delay_s == RETRY_INITIAL_S:
                    log.warning("%s: lost the controller at %s (%s); keeping the last fleet, retrying",
                                self.name, self.address, exc.code().name)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, RETRY_MAX_S)
