"""Batches from a batcher to a preprocess worker as frames on one relay stream (``serve_batches``,
``PreprocessDispatcher``), and unary ProcessBatch calls to a worker from before the relay.

Real gRPC over loopback on both sides; the worker's batch processor is a fake (its core is tested
on its own): what is checked here is the way in and out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client import REGISTRY

from flotilla.api.v1 import inference_pb2, preprocess_pb2, preprocess_pb2_grpc, relay_pb2
from flotilla.common.clock import MonotonicClock
from flotilla.common.peer import GrpcPeer
from flotilla.common.relay import RelayServicer
from flotilla.common.server import ServiceServer
from flotilla.common.wire import PROCESS_BATCH_METHOD, RELAY_SERVICE
from flotilla.errors import MalformedRequest, ModelNotFound, NotFound, Unavailable, Unimplemented
from flotilla.pool.pool import EndpointPool
from flotilla.services.batcher.dispatch import PreprocessDispatcher
from flotilla.services.preprocess.processor import BatchOutcome, ClassScore, ItemOutcome, ItemRequest
from flotilla.services.preprocess.server import PreprocessorServicer, serve_batches

Peer = GrpcPeer[preprocess_pb2_grpc.PreprocessorStub]


@dataclass
class FakeProcessor:
    """Answers every item with one class named after its uuid; records what it was asked."""

    calls: list[tuple[str, list[str], float | None]] = field(default_factory=list)

    async def process(
        self, model_name: str, items: Sequence[ItemRequest], *, version: int = 0, timeout_s: float | None = None
    ) -> BatchOutcome:
        self.calls.append((model_name, [i.image_uuid for i in items], timeout_s))
        if model_name == "missing":
            raise ModelNotFound("model 'missing' is not served here (served: m)")
        return BatchOutcome([ItemOutcome(classes=[ClassScore(7, f"label of {i.image_uuid}", 0.5)]) for i in items],
                            "triton:1")


class CountingServicer(PreprocessorServicer):
    """The real servicer, counting the unary calls it answers."""

    unary_calls = 0

    async def ProcessBatch(self, request, context):  # type: ignore[no-untyped-def]
        self.unary_calls += 1
        return await super().ProcessBatch(request, context)


@dataclass
class Worker:
    servicer: CountingServicer
    processor: FakeProcessor
    relay: RelayServicer[preprocess_pb2.ProcessBatchResponse] | None
    peer: Peer


async def start_worker(*, relay: bool) -> tuple[Worker, ServiceServer]:
    processor = FakeProcessor()
    servicer = CountingServicer(processor, None)  # type: ignore[arg-type]  # no backend: GetPools is not called
    server = ServiceServer("preprocess", [], grace_s=0, tier="preprocess")
    if relay:
        relay_servicer = serve_batches(server, servicer)
    else:  # a worker from before the relay: unary ProcessBatch only
        relay_servicer = None
        preprocess_pb2_grpc.add_PreprocessorServicer_to_server(servicer, server.server)
    port = await server.start("127.0.0.1", 0)
    return Worker(servicer, processor, relay_servicer, GrpcPeer(f"127.0.0.1:{port}", preprocess_pb2_grpc.PreprocessorStub, tier="preprocess worker")), server


@pytest.fixture(params=[True, False], ids=["relay", "before-relay"])
async def worker(request: pytest.FixtureRequest) -> AsyncIterator[Worker]:
    started, server = await start_worker(relay=request.param)
    try:
        yield started
    finally:
        await started.peer.close()
        await server.stop()


def dispatcher_to(worker: Worker, model: str = "m") -> PreprocessDispatcher:
    return PreprocessDispatcher(model, EndpointPool("worker", {worker.peer.address: worker.peer}),
                                batch_timeout_s=5, clock=MonotonicClock())


def items(*uuids: str) -> list[preprocess_pb2.BatchItem]:
    return [preprocess_pb2.BatchItem(image_uuid=u, top_k=1) for u in uuids]


def answered(model: str) -> float:
    """The worker's count of ProcessBatch calls answered OK for ``model`` (its request metrics)."""
    labels = {"tier": "preprocess", "method": "ProcessBatch", "model": model, "code": "OK"}
    return REGISTRY.get_sample_value("flotilla_grpc_requests_total", labels) or 0.0


async def test_each_batch_is_answered_item_by_item_whichever_way_it_went(worker: Worker) -> None:
    dispatcher = dispatcher_to(worker)
    counted_before = answered("m")
    for batch in (("a", "b", "c"), ("d",)):
        answers = await dispatcher(items(*batch), None)
        assert all(isinstance(a, inference_pb2.ClassifyResponse) for a in answers)
        assert [a.classes[0].label for a in answers] == [f"label of {u}" for u in batch]  # type: ignore[union-attr]
    assert [uuids for _, uuids, _ in worker.processor.calls] == [["a", "b", "c"], ["d"]]
    timeouts = [timeout_s for _, _, timeout_s in worker.processor.calls]
    assert all(t is not None and 4 < t < 5.1 for t in timeouts), timeouts  # the batch's deadline (5 s) went along
    assert answered("m") == counted_before + 2  # each batch one call of its model, either way
    if worker.relay is not None:  # both batches rode the relay stream: no unary call
        assert (worker.relay.calls_received, worker.servicer.unary_calls) == (2, 0)
        assert not worker.peer.relay_unimplemented
    else:  # the first batch found no relay and went again as a unary call, the second unary too
        assert worker.servicer.unary_calls == 2
        assert not worker.peer.relay.answered  # (the relay is marked UNIMPLEMENTED unless a write raced that)


async def test_the_workers_failure_of_a_batch_reaches_the_batcher_as_its_status(worker: Worker) -> None:
    with pytest.raises(NotFound, match="'missing' is not served here"):
        await dispatcher_to(worker, "missing")(items("a"), None)
    assert not worker.peer.relay_unimplemented or worker.relay is None


async def test_the_workers_relay_takes_only_well_formed_batches() -> None:
    servicer = PreprocessorServicer(FakeProcessor(), None)  # type: ignore[arg-type]
    with pytest.raises(Unimplemented, match="'/x.Other/Call' is not served by the preprocess worker"):
        servicer.start(relay_pb2.CallFrame(id=1, method="/x.Other/Call"))
    with pytest.raises(MalformedRequest, match="relay frame 2 is not a ProcessBatchRequest"):
        servicer.start(relay_pb2.CallFrame(id=2, method=PROCESS_BATCH_METHOD, request=b"\xff\xff\xff"))
    request = preprocess_pb2.ProcessBatchRequest(model_name="m", items=items("a"))
    answer = await servicer.start(relay_pb2.CallFrame(id=3, method=PROCESS_BATCH_METHOD,
                                                      request=request.SerializeToString(), timeout_s=2.5))
    assert answer.results[0].response.classes[0].label == "label of a"
    assert answer.backend == "triton:1"


async def test_a_relay_that_breaks_before_the_worker_ever_answered_sends_the_batch_unary() -> None:
    """What a batcher sees when its first frame's write races the UNIMPLEMENTED of a worker from before
    the relay: the stream ends INTERNAL ("Internal error from Core"), not UNIMPLEMENTED."""
    processor = FakeProcessor()
    servicer = CountingServicer(processor, None)  # type: ignore[arg-type]
    server = ServiceServer("preprocess", [], grace_s=0, tier="preprocess")
    preprocess_pb2_grpc.add_PreprocessorServicer_to_server(servicer, server.server)

    async def broken(requests, context):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.INTERNAL, "Internal error from Core")
        yield relay_pb2.AnswerFrames()  # never reached: makes this a stream handler

    server.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        RELAY_SERVICE, {"Calls": grpc.stream_stream_rpc_method_handler(broken)})])
    port = await server.start("127.0.0.1", 0)
    peer: Peer = GrpcPeer(f"127.0.0.1:{port}", preprocess_pb2_grpc.PreprocessorStub)
    worker = Worker(servicer, processor, None, peer)
    try:
        answers = await dispatcher_to(worker)(items("a"), None)
        assert answers[0].classes[0].label == "label of a"  # type: ignore[union-attr]
        assert servicer.unary_calls == 1 and not peer.relay_unimplemented and not peer.relay.answered
    finally:
        await peer.close()
        await server.stop()


async def test_a_worker_that_answered_on_its_relay_is_sent_no_unary_call_once_it_is_gone() -> None:
    worker, server = await start_worker(relay=True)
    try:
        dispatcher = dispatcher_to(worker)
        await dispatcher(items("a"), None)
        assert worker.peer.relay.answered
        await server.stop()
        with pytest.raises(Unavailable, match="no worker is available") as failed:
            await dispatcher(items("b"), None)
        assert f"last error: preprocess worker {worker.peer.address} " in failed.value.message  # names the tier
        assert worker.servicer.unary_calls == 0
    finally:
        await worker.peer.close()
        await server.stop()
