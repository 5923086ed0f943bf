"""Following the controller: every data-plane service learns the fleet here.

``FleetWatcher`` holds the controller's WatchFleet stream open and hands
each snapshot (every registered model: spec, ready copies, batchers) to a
callback. When the controller is away (restarting) the last snapshot stays
in force and the watcher reconnects with backoff, so the data plane keeps
serving what it knew.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

import grpc

from flotilla.api.v1 import controller_pb2, controller_pb2_grpc
from flotilla.config import ModelSettings

log = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 2.0

OnFleet = Callable[[controller_pb2.Fleet], Awaitable[None]]


def spec_of(status: controller_pb2.ModelStatus) -> ModelSettings:
    return ModelSettings.model_validate(json.loads(status.spec_json))


def ready_replicas(status: controller_pb2.ModelStatus) -> list[str]:
    """Replicas holding a ready copy: the only ones that get the model's batches."""
    return [c.replica for c in status.copies if c.state == "ready"]


class FleetWatcher:
    def __init__(self, address: str, on_fleet: OnFleet, *, name: str) -> None:
        self.address = address
        self.on_fleet = on_fleet
        self.name = name
        self.latest: controller_pb2.Fleet | None = None
        self._first = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = controller_pb2_grpc.ControllerStub(self.channel)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"fleet:{self.name}")

    async def wait_first(self, timeout_s: float) -> bool:
        """True once a first snapshot arrived (within ``timeout_s``)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first.wait(), timeout_s)
        return self._first.is_set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.channel.close()

    async def _run(self) -> None:
        delay_s = RETRY_INITIAL_S
        connected_before = False
        while True:
            try:
                async for fleet in self.stub.WatchFleet(controller_pb2.WatchFleetRequest()):
                    if not connected_before or delay_s > RETRY_INITIAL_S:
                        log.info("%s: following the controller at %s (generation %d)",
                                 self.name, self.address, fleet.generation)
                    connected_before, delay_s = True, RETRY_INITIAL_S
                    self.latest = fleet
                    try:
                        await self.on_fleet(fleet)
                    except Exception:
                        log.exception("%s: applying fleet generation %d failed", self.name, fleet.generation)
                    self._first.set()
            except grpc.aio.AioRpcError as exc:
                if delay_s == RETRY_INITIAL_S:
                    log.warning("%s: lost the controller at %s (%s); keeping the last fleet, retrying",
                                self.name, self.address, exc.code().name)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, RETRY_MAX_S)
