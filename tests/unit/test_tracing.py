"""Trace shape of a batch, in memory: a batch span links to every request that
rode in it, and the worker's span (real gRPC over loopback, the real
interceptor chain) is the batch span's child."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flotilla.api.v1 import inference_pb2, preprocess_pb2, preprocess_pb2_grpc
from flotilla.common import tracing
from flotilla.common.clock import MonotonicClock
from flotilla.common.server import GrpcPeer, ServiceServer
from flotilla.services.backend_pool.pool import EndpointPool
from flotilla.services.batcher.server import PreprocessDispatcher

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    tracing.install(tracer_provider)


class Worker(preprocess_pb2_grpc.PreprocessorServicer):
    async def ProcessBatch(self, request, context):  # type: ignore[no-untyped-def]
        return preprocess_pb2.ProcessBatchResponse(
            backend="triton:1",
            results=[preprocess_pb2.ItemResult(response=inference_pb2.ClassifyResponse(image_uuid=i.image_uuid))
                     for i in request.items],
        )


async def test_a_batch_span_links_its_requests_and_parents_the_worker_span() -> None:
    EXPORTER.clear()
    server = ServiceServer("preprocess", [], grace_s=0, tier="preprocess")
    preprocess_pb2_grpc.add_PreprocessorServicer_to_server(Worker(), server.server)
    port = await server.start("127.0.0.1", 0)
    address = f"127.0.0.1:{port}"
    peer = GrpcPeer(address, preprocess_pb2_grpc.PreprocessorStub)
    dispatcher = PreprocessDispatcher("m", EndpointPool("worker", {address: peer}), batch_timeout_s=5,
                                      clock=MonotonicClock())
    items = []
    request_spans = []
    try:
        for i in range(3):  # three requests, each in its own trace (as the batcher's handler sees them)
            with tracing.tracer.start_as_current_span(f"batcher Classify {i}") as span:
                request_spans.append(span.get_span_context())
                items.append(preprocess_pb2.BatchItem(image_uuid=f"u{i}", traceparent=tracing.current_traceparent()))
        answers = await dispatcher(items, None)
    finally:
        await peer.close()
        await server.stop()

    assert [a.image_uuid for a in answers] == ["u0", "u1", "u2"]
    spans = {s.name: s for s in EXPORTER.get_finished_spans()}
    batch, worker = spans["batch m"], spans["preprocess ProcessBatch"]
    assert {link.context.span_id for link in batch.links} == {c.span_id for c in request_spans}
    assert len({c.trace_id for c in request_spans}) == 3, "each request is its own trace"
    assert batch.attributes["flotilla.batch_size"] == 3
    assert batch.attributes["flotilla.worker"] == address
    assert batch.attributes["flotilla.replica"] == "triton:1"
    assert worker.parent is not None and worker.parent.span_id == batch.context.span_id
    assert worker.context.trace_id == batch.context.trace_id
    assert worker.kind == trace.SpanKind.SERVER
    assert worker.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]


def test_with_tracing_off_spans_and_propagation_do_no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_installed", False)
    with tracing.span("batch m", attributes={"flotilla.batch_size": 8}) as span:
        span.set_attribute("flotilla.replica", "triton:1")  # a no-op, not an error
        assert not span.is_recording()
        assert tracing.current_traceparent() == ""
        assert tracing.inject((("x-model", "m"), ("traceparent", "00-ab-cd-01"))) == (("x-model", "m"),)
    assert tracing.links_from(["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]) == []
