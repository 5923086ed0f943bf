"""A batcher process's models: one lane per model, kept equal to the controller's assignment (no grpc).

A batcher process is a shard: it hosts the queues of the models the
controller assigns it (a dedicated batcher: of its one model). Each model
has a ``Lane``: its own BatchQueue (its spec's batching policy, metrics
labelled by model), the dispatcher that sends its batches to the shared
preprocess-worker pool, and the ClassifyRequests that parse and queue its
calls. ``Lanes.assign`` makes the lanes follow an assignment:

- a model new to the shard gets a lane, serving at once;
- a model whose spec changed keeps its lane and queue (queued requests stay):
  the new batching policy, versions and batch timeout apply at once. An
  assignment that repeats a spec leaves the lane alone, so a policy an
  operator set at run time (BatcherAdmin) holds until the spec changes;
- a model taken away is LEAVING: for ``move_grace_s`` it still takes calls
  (routers follow the move a little later, and calls they sent before it
  must land), then it is DRAINING: new calls get UNAVAILABLE (a router's pool
  retries them on another batcher) while what is queued and in flight is
  answered. Once empty (or after ``DRAIN_TIMEOUT_S``, when whatever is left
  gets UNAVAILABLE: nothing is dropped without an answer) the queue stops and
  the lane is gone; a model given back before that keeps its lane.

A call names its model (``x-model-name``); ``for_call`` finds the lane or
says why not: NOT_FOUND for a model this shard does not host, naming the
ones it does (at most ``LISTED_MODELS`` of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from flotilla.api.v1 import inference_pb2, preprocess_pb2
from flotilla.common import metrics
from flotilla.common.clock import Clock
from flotilla.config import ModelSettings
from flotilla.errors import InvalidArgument, ModelNotFound, Unavailable
from flotilla.services.batcher.queue import BatchQueue
from flotilla.services.batcher.requests import ClassifyRequests

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05
"""How often a draining lane looks whether its queue is empty."""
DRAIN_TIMEOUT_S = 60.0
"""Longest a draining lane waits for its queue to empty; what is left then gets UNAVAILABLE."""
LISTED_MODELS = 10
"""Most hosted models an error message names."""


class LaneState(enum.Enum):
    SERVING = "serving"
    LEAVING = "leaving"
    """Taken away by the controller; still takes calls for move_grace_s."""
    DRAINING = "draining"
    """Past its grace: refuses new calls (UNAVAILABLE), answers what it holds, then goes."""


class Dispatcher(Protocol):
    """What a lane's spec sets on its dispatcher (``dispatch.PreprocessDispatcher``)."""

    batch_timeout_s: float
    default_version: int


Queue = BatchQueue[preprocess_pb2.BatchItem, inference_pb2.ClassifyResponse]


@dataclass(eq=False)
class Lane:
    """One model's queue on this batcher, and what feeds and empties it."""

    model: str
    spec: ModelSettings
    """The spec the controller gave (the lane follows it when it changes)."""
    queue: Queue
    requests: ClassifyRequests
    dispatcher: Dispatcher
    state: LaneState = LaneState.SERVING
    retiring: asyncio.Task[None] | None = field(default=None, repr=False)
    """While LEAVING or DRAINING: the task that ends the lane."""

    def follow(self, spec: ModelSettings) -> None:
        """Apply a changed spec; queued requests stay queued."""
        if spec == self.spec:
            return
        if spec.batching != self.spec.batching:
            self.queue.set_policy(spec.batching)
        self.requests.versions = list(spec.versions)
        self.dispatcher.batch_timeout_s = spec.batching.batch_timeout_s
        self.dispatcher.default_version = spec.served_version
        self.spec = spec


LaneFactory = Callable[[str, ModelSettings], Lane]
"""(model, spec) -> a new lane (its queue not started yet)."""


def listed(names: list[str]) -> str:
    """``a, b, c`` or ``a, b, ... and 7 more``: at most LISTED_MODELS names."""
    shown = ", ".join(names[:LISTED_MODELS])
    more = len(names) - LISTED_MODELS
    return f"{shown} and {more} more" if more > 0 else shown or "none"


class Lanes:
    """The lanes of this batcher process, by model."""

    def __init__(self, make_lane: LaneFactory, *, clock: Clock, move_grace_s: float, dedicated_model: str = "") -> None:
        self._make_lane = make_lane
        self.clock = clock
        self.move_grace_s = move_grace_s
        self.dedicated_model = dedicated_model
        self._lanes: dict[str, Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._served: list[str] = []

    # -- reading ---------------------------------------------------------------

    def __iter__(self) -> Iterator[Lane]:
        """Every lane, leaving and draining ones included, by model name."""
        return iter([self._lanes[m] for m in sorted(self._lanes)])

    def __len__(self) -> int:
        return len(self._lanes)

    def get(self, model: str) -> Lane | None:
        return self._lanes.get(model)

    @property
    def hosted(self) -> list[str]:
        """Models whose calls this batcher takes now (serving or leaving), by name."""
        return sorted(m for m, lane in self._lanes.items() if lane.state is not LaneState.DRAINING)

    def _where(self) -> str:
        who = f"the dedicated batcher of {self.dedicated_model!r}" if self.dedicated_model else "this batcher"
        hosted = self.hosted
        return f"{who} hosts {len(hosted)} model{'s' if len(hosted) != 1 else ''}: {listed(hosted)}"

    def find(self, model: str) -> Lane:
        """The lane of ``model`` in any state; with ``model`` empty, the only lane there is.

        NOT_FOUND for a model not here; INVALID_ARGUMENT for no name when there is not exactly one lane.
        """
        if not model:
            if len(self._lanes) == 1:
                return next(iter(self._lanes.values()))
            raise InvalidArgument(f"name a model (model_name, or the x-model-name header): {self._where()}")
        lane = self._lanes.get(model)
        if lane is None:
            raise ModelNotFound(f"model {model!r} is not hosted here; {self._where()}")
        return lane

    def for_call(self, model: str) -> Lane:
        """The lane that takes a call for ``model`` now (``find``); UNAVAILABLE once the lane is draining."""
        lane = self.find(model)
        if lane.state is LaneState.DRAINING:
            raise Unavailable(f"model {lane.model!r} moved off this batcher; retry (the router's pool does)")
        return lane

    # -- following the controller -------------------------------------------------

    def assign(self, models: Mapping[str, ModelSettings]) -> None:
        """Make the lanes follow the controller's whole assignment: ``models`` by name, with their specs."""
        for model, spec in models.items():
            lane = self._lanes.get(model)
            if lane is None:
                lane = self._make_lane(model, spec)
                self._lanes[model] = lane
                lane.queue.start()
                log.info("batcher: now hosting %s", model)
                continue
            lane.follow(spec)
            if lane.state is not LaneState.SERVING:
                self._cancel_retiring(lane)
                lane.state = LaneState.SERVING
                log.info("batcher: %s given back before it left; it keeps its queue", model)
        for model, lane in list(self._lanes.items()):
            if model not in models and lane.state is LaneState.SERVING:
                lane.state = LaneState.LEAVING
                lane.retiring = self._own(self._retire(lane, self.clock.now() + self.move_grace_s), f"retire:{model}")
                log.info("batcher: %s moved away; taking its calls for %.1f s more, then draining",
                         model, self.move_grace_s)
        self._changed()

    async def _retire(self, lane: Lane, leave_at_s: float) -> None:
        await self.clock.sleep(leave_at_s - self.clock.now())
        lane.state = LaneState.DRAINING
        self._changed()
        deadline_s = self.clock.now() + DRAIN_TIMEOUT_S
        while (lane.queue.depth or lane.queue.inflight) and self.clock.now() < deadline_s:
            await self.clock.sleep(DRAIN_POLL_S)
        # Out of the table first: from here on the model is not hosted, and one given back gets a new lane.
        del self._lanes[lane.model]
        lane.retiring = None
        self._changed()
        left = lane.queue.depth + lane.queue.inflight
        if left:
            log.warning("batcher: %s did not drain within %.0f s; %d queued or in flight get UNAVAILABLE",
                        lane.model, DRAIN_TIMEOUT_S, left)
        await lane.queue.stop()  # anything still there is answered UNAVAILABLE, never dropped
        if lane.model not in self._lanes:
            lane.queue.forget_metrics()
        log.info("batcher: %s left (its queue formed %d batches for %d requests)",
                 lane.model, lane.queue.stats.batches, lane.queue.stats.items)

    def _cancel_retiring(self, lane: Lane) -> None:
        if lane.retiring is not None:
            lane.retiring.cancel()
            lane.retiring = None

    def _own(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _changed(self) -> None:
        hosted = self.hosted
        if hosted != self._served:
            metrics.models_served("batcher", hosted)
            self._served = hosted

    async def close(self) -> None:
        """Stop every lane: their queues answer what they hold with UNAVAILABLE."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            await lane.queue.stop()
        self._changed()
