"""The batcher's place in the controller: its counters out, its models in (``ShardHeartbeat``).

The batcher sends heartbeats (``reports.HeartbeatBook``) one after the other
and applies each changed assignment to its lanes. The controller holds a
heartbeat until the batcher's assignment changes or one heartbeat interval
passes, and then answers ``interval_s`` 0: call again at once (an answer
with ``interval_s`` > 0 says how long to wait). After a changed assignment
the next heartbeat goes at once too: it acknowledges the assignment, and
only then do routes name this batcher for the models it brought. A call
for a model this batcher does not host asks for a heartbeat answer before it
is NOT_FOUND (``fresh``): a batcher restarted on its address serves before
its first answer has given it back its models. A heartbeat from an address
the controller does not know registers the shard; one silent for
``heartbeat_timeout_s`` is dropped and its models move. While the controller
does not answer (restarting) the lanes stay as they are and the heartbeat is
retried every ``controller.shards.heartbeat_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from flotilla.api.v1 import controller_pb2_grpc
from flotilla.common.tasks import cancel_and_wait
from flotilla.common.tls import PLAINTEXT, Dialer, RenewingChannel
from flotilla.common.wire import CONTROL_CHANNEL_OPTIONS
from flotilla.services.batcher.lanes import Lanes
from flotilla.services.batcher.reports import HeartbeatBook

log = logging.getLogger(__name__)

ANSWER_MARGIN_S = 2.0
"""How long a heartbeat waits for its answer beyond the interval the controller may hold it for."""
MIN_SPACING_S = 0.05
"""Least time between two heartbeats but the one that acknowledges a new assignment."""


class Heartbeat:
    """Sends this batcher's heartbeats to the controller until stopped."""

    def __init__(
        self, controller: str, book: HeartbeatBook, lanes: Lanes, *, interval_s: float, dialer: Dialer = PLAINTEXT
    ) -> None:
        """``interval_s``: ``controller.shards.heartbeat_interval_s``, the controller's too (it holds a
        heartbeat that long at most)."""
        self.controller = controller
        self.book = book
        self.lanes = lanes
        self.interval_s = interval_s
        """The interval the controller gives (0: call again at once), else the configured one."""
        self.hold_s = interval_s
        """The longest the controller may hold a heartbeat."""
        self._channel = RenewingChannel(dialer, controller, CONTROL_CHANNEL_OPTIONS)
        self.stub = controller_pb2_grpc.ControllerStub(self._channel.channel)
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._answered: asyncio.Future[None] | None = None
        """Resolved when the heartbeat in flight (or the next one) has been answered or has failed."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def beat(self) -> bool | None:
        """One heartbeat: None if the controller did not answer, else whether the assignment changed."""
        if self._channel.renew():  # certificate files renewed (TLS)
            self.stub = controller_pb2_grpc.ControllerStub(self._channel.channel)
        request = self.book.request()
        try:
            reply = await self.stub.ShardHeartbeat(request, timeout=self.hold_s + ANSWER_MARGIN_S)
        except grpc.aio.AioRpcError as exc:
            self.book.failed()
            if not self._failing:  # once per outage, not once per heartbeat
                log.warning("batcher: no heartbeat answer from the controller at %s (%s: %s); keeping the %d "
                            "models hosted and retrying every %.1f s", self.controller, exc.code().name,
                            exc.details(), len(self.lanes.hosted), self.hold_s)
            self._failing = True
            return None
        if self._failing:
            log.info("batcher: the controller at %s answers heartbeats again", self.controller)
        self._failing = False
        assignment = self.book.answered(reply)
        if assignment is not None:
            self.lanes.assign(assignment)
            log.info("batcher: assignment %d from the controller: %d models", reply.assignment, len(assignment))
        self.interval_s = reply.interval_s
        if reply.interval_s > 0:
            self.hold_s = reply.interval_s
        return assignment is not None

    async def fresh(self) -> None:
        """Until the heartbeat in flight, or the next one (sent at once), has been answered or has failed."""
        if self._answered is None:
            self._answered = asyncio.get_running_loop().create_future()
        self._wake.set()
        await asyncio.shield(self._answered)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            changed: bool | None = None
            try:
                changed = await self.beat()
            except Exception:  # a bug must not end the heartbeat: the shard would be dropped
                log.exception("batcher: heartbeat failed")
            answered, self._answered = self._answered, None
            if answered is not None and not answered.done():
                answered.set_result(None)
            if changed:
                continue  # acknowledge the new assignment at once: routes name this batcher only then
            await asyncio.sleep(MIN_SPACING_S)
            if self._wake.is_set():
                continue  # a call asked for an answer
            wait_s = self.hold_s if changed is None else self.interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait_s - MIN_SPACING_S, 0.0))

    async def stop(self) -> None:
        if self._answered is not None and not self._answered.done():
            self._answered.set_result(None)
        await cancel_and_wait(self._task)
        self._task = None
        await self._channel.close()
