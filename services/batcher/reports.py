"""What a batcher tells the controller in each heartbeat, and what it learns from the answer (no grpc).

Each heartbeat (``ShardHeartbeatRequest``) carries the counters of the
queues that changed since the last heartbeat the controller ANSWERED: every
queue on the first one, and after a heartbeat that failed the queues it
carried stay pending (the next one carries their counters as they are
then), so the controller misses no change however many heartbeats are lost.
It also carries the assignment the shard holds; the answer lists the models
only when the controller's assignment differs, and ``HeartbeatBook.answered``
turns that list into specs for ``Lanes.assign``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from flotilla.api.v1 import controller_pb2
from flotilla.common.request_totals import RequestTotals
from flotilla.config import ModelSettings
from flotilla.services.batcher.lanes import Lane, Lanes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Counters:
    """One queue's counters as a heartbeat reports them (``QueueCounters``)."""

    requests: RequestTotals
    queue_depth: int
    inflight_batches: int
    last_arrival_s: float | None = None
    """The latest arrival, on the queue's clock (changes only with the arrivals)."""

    @classmethod
    def of(cls, lane: Lane) -> Counters:
        totals = lane.queue.totals
        return cls(totals.snapshot(), lane.queue.depth, lane.queue.inflight, totals.last_arrival_s)

    def to_pb(self, model: str, now_s: float) -> controller_pb2.QueueCounters:
        """The message, with the latest arrival as seconds before ``now_s`` (the queue's clock now)."""
        return controller_pb2.QueueCounters(
            model=model, **self.requests.pb_fields(), queue_depth=self.queue_depth,
            inflight_batches=self.inflight_batches,
            idle_s=0.0 if self.last_arrival_s is None else max(now_s - self.last_arrival_s, 0.0),
        )


class HeartbeatBook:
    """Builds each heartbeat and keeps what the controller has acknowledged."""

    def __init__(
        self, address: str, lanes: Lanes, *, dedicated_model: str = "",
        cpu_seconds: Callable[[], float] = time.process_time,
    ) -> None:
        self.address = address
        self.lanes = lanes
        self.dedicated_model = dedicated_model
        self.cpu_seconds = cpu_seconds
        """CPU time (user + system) of this process since it started."""
        self.assignment = 0
        """The controller's assignment number the lanes follow (0 before the first answer)."""
        self.started = True
        """No heartbeat answered yet."""
        self._answered: dict[str, Counters] = {}
        """Model -> the counters the controller has from the last answered heartbeat that carried them."""
        self._sent: dict[str, Counters] = {}
        """What the heartbeat in flight carries."""
        self._assigned: dict[str, ModelSettings] = {}
        """The models the controller assigns this batcher (answers bring the whole list, or its changes)."""

    def request(self) -> controller_pb2.ShardHeartbeatRequest:
        """The next heartbeat: the counters changed since the last answered one, the assignment held."""
        self._sent = {}
        now_s = self.lanes.clock.now()
        for lane in self.lanes:
            counters = Counters.of(lane)
            if self._answered.get(lane.model) != counters:
                self._sent[lane.model] = counters
        return controller_pb2.ShardHeartbeatRequest(
            address=self.address, dedicated_model=self.dedicated_model,
            counters=[c.to_pb(model, now_s) for model, c in self._sent.items()],
            cpu_seconds_total=self.cpu_seconds(), assignment=self.assignment, started=self.started,
        )

    def answered(self, reply: controller_pb2.ShardHeartbeatResponse) -> dict[str, ModelSettings] | None:
        """The controller answered the latest ``request``: what it carried is acknowledged. Returns the
        whole new assignment (model -> spec) when it changed, else None. A spec that does not validate
        is logged and left out (its lane, if any, goes as if unassigned: the controller's registry
        holds only validated specs, so this is a version skew)."""
        self._answered.update(self._sent)
        self._sent = {}
        hosted = {lane.model for lane in self.lanes}
        for model in [m for m in self._answered if m not in hosted]:  # its lane is gone
            del self._answered[model]
        self.started = False
        if not reply.changed:
            return None
        if reply.full:
            self._assigned = {}
        for entry in reply.models:
            try:
                self._assigned[entry.name] = ModelSettings.model_validate_json(entry.spec_json)
            except ValidationError as exc:
                self._assigned.pop(entry.name, None)
                log.error("batcher: the controller's spec of %s does not validate here; not hosting it: %s",
                          entry.name, exc)
        for name in reply.removed_models:
            self._assigned.pop(name, None)
        self.assignment = reply.assignment
        return dict(self._assigned)

    def failed(self) -> None:
        """The latest heartbeat got no answer: what it carried stays pending."""
        self._sent = {}
