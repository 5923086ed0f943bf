"""A batcher process as a shard: its lanes follow the controller's assignment, a model taken away
keeps taking calls for the grace and then drains, heartbeats carry only changed counters (and keep
those a failed heartbeat carried), and a call for a model not hosted here is NOT_FOUND."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from fakes import FakeClock, settle

from flotilla.api.v1 import controller_pb2, inference_pb2, preprocess_pb2, relay_pb2
from flotilla.common.wire import CLASSIFY_METHOD, MODEL_HEADER
from flotilla.config import BatchingSettings, ModelSettings
from flotilla.errors import InvalidArgument, ModelNotFound, Unavailable
from flotilla.services.batcher.heartbeat import Heartbeat
from flotilla.services.batcher.lanes import DRAIN_TIMEOUT_S, LISTED_MODELS, Lane, Lanes, LaneState
from flotilla.services.batcher.queue import BatchQueue
from flotilla.services.batcher.reports import HeartbeatBook
from flotilla.services.batcher.requests import ClassifyRequests
from flotilla.services.batcher.server import ClassifierHandler

GRACE_S = 5.0
DELAY_US = 1000


class FakeDispatcher:
    """Answers every item at once, or holds every batch until ``release``."""

    def __init__(self, model: str, spec: ModelSettings) -> None:
        self.model = model
        self.batch_timeout_s = spec.batching.batch_timeout_s
        self.default_version = spec.served_version
        self.gate: asyncio.Event | None = None

    async def __call__(
        self, items: list[preprocess_pb2.BatchItem], deadline_s: float | None
    ) -> list[inference_pb2.ClassifyResponse]:
        if self.gate is not None:
            await self.gate.wait()
        return [inference_pb2.ClassifyResponse(image_uuid=i.image_uuid, model_name=self.model) for i in items]


def spec(**batching: Any) -> ModelSettings:
    return ModelSettings(storage_uri="s3://b/m", batching=BatchingSettings(max_queue_delay_us=DELAY_US, **batching))


class Shard:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.dispatchers: dict[str, FakeDispatcher] = {}
        self.lanes = Lanes(self.make_lane, clock=self.clock, move_grace_s=GRACE_S)
        self.handler = ClassifierHandler(self.lanes)

    def make_lane(self, model: str, spec: ModelSettings) -> Lane:
        dispatcher = self.dispatchers[model] = FakeDispatcher(model, spec)
        queue: BatchQueue[Any, Any] = BatchQueue(model, spec.batching, dispatcher, clock=self.clock)
        return Lane(model, spec, queue, ClassifyRequests(model, queue, self.clock, spec.versions), dispatcher)

    def call(self, model: str) -> asyncio.Future[inference_pb2.ClassifyResponse]:
        """A Classify call relayed by a router, as the batcher's handler takes it."""
        body = inference_pb2.ClassifyRequest(image_uuid=str(uuid.uuid4()), model_name=model, top_k=1)
        frame = relay_pb2.CallFrame(
            id=1, method=CLASSIFY_METHOD, request=body.SerializeToString(),
            headers=[relay_pb2.Header(key=MODEL_HEADER, value=model)],
        )
        return self.handler.start(frame)


@pytest.fixture
async def shard() -> Any:
    s = Shard()
    yield s
    await s.lanes.close()


async def test_lanes_follow_the_assignment(shard: Shard) -> None:
    shard.lanes.assign({"a": spec(), "b": spec()})
    assert shard.lanes.hosted == ["a", "b"]
    call = shard.call("a")
    await shard.clock.advance(DELAY_US / 1e6)
    assert (await call).model_name == "a"

    shard.lanes.assign({"b": spec(), "c": spec()})
    assert shard.lanes.hosted == ["a", "b", "c"], "a leaves only after its grace"
    await shard.clock.advance(GRACE_S)
    await shard.clock.advance(0.1)
    assert shard.lanes.hosted == ["b", "c"]
    assert shard.lanes.get("a") is None


async def test_a_model_not_hosted_is_not_found_naming_the_hosted_ones(shard: Shard) -> None:
    shard.lanes.assign({f"m{i:02d}": spec() for i in range(LISTED_MODELS + 3)})
    with pytest.raises(ModelNotFound) as raised:
        shard.call("elsewhere")
    message = str(raised.value)
    assert "'elsewhere' is not hosted here" in message and "hosts 13 models" in message
    assert "m00" in message and "and 3 more" in message and "m12" not in message, "the list is bounded"


async def test_a_call_for_a_model_not_hosted_waits_for_a_fresh_heartbeat_first(shard: Shard) -> None:
    """Routers learn from the fleet that the controller gave this batcher a model before the batcher's
    next heartbeat would: such a call asks for a heartbeat now and is served once it is answered."""
    refreshed = 0

    async def heartbeat_now() -> None:
        nonlocal refreshed
        refreshed += 1
        shard.lanes.assign({"a": spec(), "new": spec()})

    shard.lanes.assign({"a": spec()})
    shard.handler.refresh = heartbeat_now
    call = shard.call("new")
    await settle()
    await shard.clock.advance(DELAY_US / 1e6)
    assert (await call).model_name == "new" and refreshed == 1

    with pytest.raises(ModelNotFound, match="'elsewhere' is not hosted here"):
        await shard.call("elsewhere")
    assert refreshed == 2


async def test_an_unnamed_call_needs_exactly_one_lane(shard: Shard) -> None:
    shard.lanes.assign({"only": spec()})
    assert shard.lanes.find("").model == "only"
    shard.lanes.assign({"only": spec(), "other": spec()})
    with pytest.raises(InvalidArgument, match="name a model"):
        shard.lanes.find("")


async def test_a_model_taken_away_takes_calls_for_the_grace_then_drains_what_it_holds(shard: Shard) -> None:
    shard.lanes.assign({"a": spec(), "b": spec()})
    gate = shard.dispatchers["a"].gate = asyncio.Event()
    before = shard.call("a")
    await shard.clock.advance(DELAY_US / 1e6)  # its batch is out, held by the worker
    shard.lanes.assign({"b": spec()})
    lane = shard.lanes.get("a")
    assert lane is not None and lane.state is LaneState.LEAVING

    await shard.clock.advance(GRACE_S - 0.5)
    during = shard.call("a")  # routed before the routers followed the move: it still lands
    await shard.clock.advance(DELAY_US / 1e6)
    await shard.clock.advance(0.5)
    assert lane.state is LaneState.DRAINING
    with pytest.raises(Unavailable, match="moved off this batcher"):  # a router's pool retries it elsewhere
        shard.call("a")
    assert shard.lanes.get("a") is lane, "it stays until its queue has drained"

    gate.set()
    await settle()
    assert (await before).model_name == (await during).model_name == "a", "nothing it held is dropped"
    await shard.clock.advance(0.1)
    assert shard.lanes.get("a") is None
    with pytest.raises(ModelNotFound):
        shard.call("a")


async def test_a_lane_that_cannot_drain_answers_what_it_holds_with_unavailable(shard: Shard) -> None:
    shard.lanes.assign({"a": spec()})
    shard.dispatchers["a"].gate = asyncio.Event()  # the worker never answers
    held = shard.call("a")
    await shard.clock.advance(DELAY_US / 1e6)
    shard.lanes.assign({})
    await shard.clock.advance(GRACE_S)
    await shard.clock.advance(DRAIN_TIMEOUT_S)
    await shard.clock.advance(0.1)
    with pytest.raises(Unavailable):
        await held
    assert shard.lanes.get("a") is None


async def test_a_model_given_back_during_its_grace_keeps_its_queue(shard: Shard) -> None:
    shard.lanes.assign({"a": spec()})
    lane = shard.lanes.get("a")
    shard.lanes.assign({})
    await shard.clock.advance(GRACE_S / 2)
    shard.lanes.assign({"a": spec()})
    await shard.clock.advance(GRACE_S)
    assert shard.lanes.get("a") is lane and lane is not None and lane.state is LaneState.SERVING


async def test_a_changed_spec_applies_to_the_queue_and_a_repeated_one_keeps_an_operators_policy(
    shard: Shard,
) -> None:
    shard.lanes.assign({"a": spec(max_batch_size=4)})
    lane = shard.lanes.get("a")
    assert lane is not None
    lane.queue.set_policy(lane.queue.policy.model_copy(update={"max_batch_size": 2}))  # BatcherAdmin
    shard.lanes.assign({"a": spec(max_batch_size=4), "b": spec()})
    assert lane.queue.policy.max_batch_size == 2, "the same spec again leaves the lane alone"

    changed = spec(max_batch_size=16).model_copy(update={"versions": [1, 2]})
    shard.lanes.assign({"a": changed})
    assert shard.lanes.get("a") is lane
    assert lane.queue.policy.max_batch_size == 16 and lane.requests.versions == [1, 2]
    assert lane.dispatcher.default_version == 2


def answer(
    assignment: int, models: dict[str, ModelSettings] | None = None
) -> controller_pb2.ShardHeartbeatResponse:
    return controller_pb2.ShardHeartbeatResponse(
        assignment=assignment, changed=models is not None, interval_s=1.0,
        models=[controller_pb2.ShardModel(name=n, spec_json=s.model_dump_json()) for n, s in (models or {}).items()],
    )


async def test_heartbeats_carry_the_counters_changed_since_the_last_answered_one(shard: Shard) -> None:
    book = HeartbeatBook("127.0.0.1:7000", shard.lanes, cpu_seconds=lambda: 1.5)
    first = book.request()
    assert first.started and first.assignment == 0 and first.address == "127.0.0.1:7000"
    assert first.cpu_seconds_total == 1.5 and not first.counters
    assignment = book.answered(answer(3, {"a": spec(), "b": spec()}))
    assert assignment is not None and set(assignment) == {"a", "b"} and book.assignment == 3
    shard.lanes.assign(assignment)

    second = book.request()
    assert not second.started and second.assignment == 3
    assert {c.model for c in second.counters} == {"a", "b"}, "every new queue once"
    assert book.answered(answer(3)) is None
    assert not book.request().counters, "nothing changed since the answered one"
    book.answered(answer(3))

    call = shard.call("a")
    await shard.clock.advance(DELAY_US / 1e6)
    await call
    lost = book.request()
    assert [(c.model, c.arrivals_total, c.dispatched_total) for c in lost.counters] == [("a", 1, 1)]
    book.failed()  # no answer: a's counters stay pending

    shard.call("a")
    retry = book.request()
    assert [(c.model, c.arrivals_total, c.queue_depth) for c in retry.counters] == [("a", 2, 1)]
    book.answered(answer(3))
    await shard.clock.advance(DELAY_US / 1e6)
    assert [c.model for c in book.request().counters] == ["a"], "its dispatch is a change too"


async def test_a_spec_that_does_not_validate_is_left_out(shard: Shard) -> None:
    book = HeartbeatBook("127.0.0.1:7000", shard.lanes)
    book.request()
    reply = answer(1, {"a": spec()})
    reply.models.add(name="broken", spec_json='{"min_copies": -1}')
    assert set(book.answered(reply) or {}) == {"a"}


class HeldController:
    """A ShardHeartbeat stub whose answers the test gives, one per heartbeat, in order."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[controller_pb2.ShardHeartbeatRequest] = asyncio.Queue()
        self.replies: asyncio.Queue[controller_pb2.ShardHeartbeatResponse] = asyncio.Queue()

    async def ShardHeartbeat(  # noqa: N802 (the stub's name)
        self, request: controller_pb2.ShardHeartbeatRequest, timeout: float
    ) -> controller_pb2.ShardHeartbeatResponse:
        await self.requests.put(request)
        return await self.replies.get()


async def test_a_new_assignment_is_acknowledged_at_once_and_a_held_answer_is_followed_by_the_next_call(
    shard: Shard,
) -> None:
    controller = HeldController()
    heartbeat = Heartbeat("127.0.0.1:1", HeartbeatBook("127.0.0.1:7000", shard.lanes), shard.lanes, interval_s=60.0)
    heartbeat.stub = controller  # type: ignore[assignment]  # the fake answers as the controller would
    heartbeat.start()
    try:
        first = await asyncio.wait_for(controller.requests.get(), 5)
        assert first.started and first.assignment == 0
        waiting = asyncio.ensure_future(heartbeat.fresh())  # a call for a model not hosted yet
        await controller.replies.put(answer(4, {"a": spec()}))
        await asyncio.wait_for(waiting, 5)
        assert shard.lanes.hosted == ["a"], "applied before the waiting call looks again"
        ack = await asyncio.wait_for(controller.requests.get(), 5)  # at once, not after the 60 s interval
        assert ack.assignment == 4 and not ack.started
        await controller.replies.put(controller_pb2.ShardHeartbeatResponse(assignment=4, interval_s=0.0))
        again = await asyncio.wait_for(controller.requests.get(), 5)  # held answer: call again at once
        assert again.assignment == 4
    finally:
        await heartbeat.stop()
