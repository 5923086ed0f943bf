"""The batcher's place in the controller: its model's spec in, its address out.

At start the batcher registers with the controller, which answers with the
model's spec (its batching policy); a batcher deployed before its model waits
for the deploy. Once it serves, it re-registers every ``REGISTER_INTERVAL_S``
so a restarted controller routes to it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from flotilla.api.v1 import controller_pb2, controller_pb2_grpc
from flotilla.common.server import ServiceServer
from flotilla.config import ModelSettings

log = logging.getLogger(__name__)

REGISTER_INTERVAL_S = 1.0
REGISTER_TIMEOUT_S = 60.0
WAIT_FOR_MODEL_POLL_S = 2.0


class Registration:
    """Registers this batcher with the controller and keeps it registered."""

    def __init__(self, controller: str, model: str, address: str) -> None:
        self.model = model
        self.address = address
        self.channel = grpc.aio.insecure_channel(controller)
        self.stub = controller_pb2_grpc.ControllerStub(self.channel)
        self._task: asyncio.Task[None] | None = None

    async def register(self, *, announce: bool = True) -> ModelSettings:
        """The model's spec; with ``announce`` also this batcher's address (once it serves)."""
        address = self.address if announce else ""
        reply = await self.stub.RegisterBatcher(
            controller_pb2.RegisterBatcherRequest(model_name=self.model, address=address), timeout=5.0
        )
        return ModelSettings.model_validate_json(reply.spec_json)

    async def first(self, timeout_s: float, on_waiting: Callable[[str], Awaitable[None]]) -> ModelSettings:
        """The model's spec. Retries while the controller starts (SystemExit after ``timeout_s`` of no
        answer). While the controller answers that the model is not registered, waits for it to be
        deployed, asking every WAIT_FOR_MODEL_POLL_S: ``on_waiting`` runs once, with the controller's
        words, when that wait begins (a batcher deployed before its model waits instead of restarting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        waiting_since: float | None = None
        while True:
            try:
                spec = await self.register(announce=False)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    deadline = loop.time() + timeout_s  # the controller answers: only its silence has a deadline
                    if waiting_since is None:
                        waiting_since = loop.time()
                        await on_waiting(exc.details() or f"model {self.model!r} is not registered")
                    await asyncio.sleep(WAIT_FOR_MODEL_POLL_S)
                elif loop.time() > deadline:
                    raise SystemExit(f"batcher: no controller answered within {timeout_s:.0f} s: {exc.details()}") from exc
                else:
                    await asyncio.sleep(0.2)
                continue
            if waiting_since is not None:
                log.info("model %r was deployed after %.0f s of waiting", self.model, loop.time() - waiting_since)
            return spec

    def start(self, server: ServiceServer) -> None:
        """Announce this batcher once ``server`` listens, then every REGISTER_INTERVAL_S."""
        self._task = asyncio.create_task(self._keep(server), name="register")

    async def _keep(self, server: ServiceServer) -> None:
        while not server.port:
            await asyncio.sleep(0.01)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.register()
            await asyncio.sleep(REGISTER_INTERVAL_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.channel.close()
