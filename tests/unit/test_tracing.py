"""Trace shape of a batch, in memory: a batch span links to every request that
rode in it, and the worker's span (real gRPC over loopback, the real
interceptor chain) is the batch span's child, with the worker's fetches and
decode jobs under it; polling starts no trace; the sampler and the OTLP TLS
settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags
from pydantic import ValidationError
from test_processor import GOOD, GOOD_2, MISSING, FakeBackend, FakeStore, jpeg, make_processor

from flotilla.api.v1 import inference_pb2, pools_pb2, preprocess_pb2, preprocess_pb2_grpc
from flotilla.common import tracing
from flotilla.common.clock import MonotonicClock
from flotilla.common.peer import GrpcPeer
from flotilla.common.server import ServiceServer
from flotilla.config import ObservabilitySettings
from flotilla.pool.pool import EndpointPool
from flotilla.services.batcher.dispatch import PreprocessDispatcher
from flotilla.services.preprocess.processor import ItemRequest

EXPORTER = InMemorySpanExporter()
TRACER_PROVIDER = TracerProvider()
TRACER_PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    tracing.install(TRACER_PROVIDER)


class Worker(preprocess_pb2_grpc.PreprocessorServicer):
    async def ProcessBatch(self, request, context):  # type: ignore[no-untyped-def]
        return preprocess_pb2.ProcessBatchResponse(
            backend="triton:1",
            results=[preprocess_pb2.ItemResult(response=inference_pb2.ClassifyResponse(image_uuid=i.image_uuid))
                     for i in request.items],
        )

    async def GetPools(self, request, context):  # type: ignore[no-untyped-def]
        return pools_pb2.Pools()


@pytest.fixture
async def worker() -> AsyncIterator[GrpcPeer[preprocess_pb2_grpc.PreprocessorStub]]:
    """A worker server (the real interceptor) and a peer connected to it."""
    server = ServiceServer("preprocess", [], grace_s=0, tier="preprocess")
    preprocess_pb2_grpc.add_PreprocessorServicer_to_server(Worker(), server.server)
    port = await server.start("127.0.0.1", 0)
    peer = GrpcPeer(f"127.0.0.1:{port}", preprocess_pb2_grpc.PreprocessorStub)
    try:
        yield peer
    finally:
        await peer.close()
        await server.stop()


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
    assert tracing.current_context() is None  # the decode threads get no parent to carry


async def test_the_batch_span_names_the_version_that_runs(
    worker: GrpcPeer[preprocess_pb2_grpc.PreprocessorStub],
) -> None:
    """Items that name no version (0) run the model's default: the batch span says which (3), not 0."""
    EXPORTER.clear()
    dispatcher = PreprocessDispatcher("m", EndpointPool("worker", {worker.address: worker}), batch_timeout_s=5,
                                      clock=MonotonicClock(), default_version=3)
    items = [preprocess_pb2.BatchItem(image_uuid="u0"), preprocess_pb2.BatchItem(image_uuid="u1", model_version=2)]
    await dispatcher(items, None)
    versions = sorted(s.attributes["flotilla.model_version"] for s in EXPORTER.get_finished_spans()
                      if s.name == "batch m")
    assert versions == [2, 3]


@pytest.fixture
def polling_traced() -> Iterator[None]:
    tracing.install(TRACER_PROVIDER, trace_polling=True)
    try:
        yield
    finally:
        tracing.install(TRACER_PROVIDER)


async def test_polling_starts_no_trace_but_is_traced_inside_one(
    worker: GrpcPeer[preprocess_pb2_grpc.PreprocessorStub],
) -> None:
    assert worker.stub is not None
    EXPORTER.clear()
    await worker.stub.GetPools(pools_pb2.GetPoolsRequest())  # a poll on a timer: no trace of its own
    await worker.stub.ProcessBatch(preprocess_pb2.ProcessBatchRequest(model_name="m"))  # a request's work: traced
    with tracing.span("operator") as operator:  # a poll some traced work makes: part of that trace
        await worker.stub.GetPools(pools_pb2.GetPoolsRequest(), metadata=tracing.inject())
    spans = EXPORTER.get_finished_spans()
    polls = [s for s in spans if s.name == "preprocess GetPools"]
    assert [p.parent.span_id if p.parent else None for p in polls] == [operator.get_span_context().span_id]
    assert [s.name for s in spans if s.parent is None] == ["preprocess ProcessBatch", "operator"]


async def test_polling_is_traced_everywhere_when_the_setting_says_so(
    worker: GrpcPeer[preprocess_pb2_grpc.PreprocessorStub], polling_traced: None,
) -> None:
    assert worker.stub is not None
    EXPORTER.clear()
    await worker.stub.GetPools(pools_pb2.GetPoolsRequest())
    [poll] = [s for s in EXPORTER.get_finished_spans() if s.name == "preprocess GetPools"]
    assert poll.parent is None


async def test_the_workers_fetches_and_decode_jobs_are_spans_under_its_batch() -> None:
    EXPORTER.clear()
    store = FakeStore({f"{GOOD}.jpg": jpeg(60, 80), f"{GOOD_2}.jpg": jpeg(40, 40)})
    with ThreadPoolExecutor(2) as executor:
        processor = make_processor(executor, store, FakeBackend())
        processor.decode_jobs = 2
        with tracing.span("preprocess ProcessBatch") as batch:
            outcome = await processor.process("tiny", [ItemRequest(GOOD), ItemRequest(MISSING), ItemRequest(GOOD_2)])
    assert [item.error is None for item in outcome.items] == [True, False, True]
    spans = EXPORTER.get_finished_spans()
    batch_id = batch.get_span_context().span_id
    fetches = [s for s in spans if s.name == "fetch"]
    decodes = [s for s in spans if s.name == "decode"]
    assert sorted(s.attributes["flotilla.image_uuid"] for s in fetches) == sorted([GOOD, MISSING, GOOD_2])
    assert all(s.parent is not None and s.parent.span_id == batch_id for s in fetches + decodes)
    assert all(s.kind == trace.SpanKind.CLIENT for s in fetches)
    [failed] = [s for s in fetches if not s.status.is_ok]
    assert failed.attributes["flotilla.image_uuid"] == MISSING
    assert sum(s.attributes["flotilla.images"] for s in decodes) == 2  # the two fetched images
    assert len(decodes) == 2, "one span per decode job (its thread), not per image"


def _context(sampled: bool) -> SpanContext:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(trace_id=0x1234, span_id=0x5678, is_remote=True, trace_flags=flags)


def test_the_sampler_keeps_a_ratio_of_new_traces_and_follows_parents_and_riders() -> None:
    def decision(ratio: float, *, trace_id: int = 2**64 - 1, parent: bool | None = None,
                 riders: tuple[bool, ...] = ()) -> Decision:
        context = None if parent is None else trace.set_span_in_context(NonRecordingSpan(_context(parent)))
        links = [Link(_context(r)) for r in riders]
        return tracing.sampler(ratio).should_sample(context, trace_id, "s", links=links).decision

    assert decision(1.0) == Decision.RECORD_AND_SAMPLE
    assert decision(0.0) == Decision.DROP
    assert decision(0.5, trace_id=1) == Decision.RECORD_AND_SAMPLE  # a low trace id is within any ratio
    assert decision(0.5, trace_id=2**64 - 1) == Decision.DROP
    assert decision(0.0, parent=True) == Decision.RECORD_AND_SAMPLE, "a later tier follows the caller"
    assert decision(1.0, parent=False) == Decision.DROP
    # a batch: kept when any request riding in it was, whatever its own trace id
    assert decision(0.0, riders=(False, True)) == Decision.RECORD_AND_SAMPLE
    assert decision(1.0, riders=(False, False)) == Decision.DROP


def test_otlp_is_plaintext_by_default_and_tls_when_asked(tmp_path: Path) -> None:
    assert tracing.otlp_credentials(ObservabilitySettings()) is None
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    for settings in (
        ObservabilitySettings(otlp_insecure=False),  # the system's roots
        ObservabilitySettings(otlp_insecure=False, otlp_certificate_file=ca),
        ObservabilitySettings(otlp_insecure=False, otlp_certificate_file=ca, otlp_client_certificate_file=ca,
                              otlp_client_key_file=ca),
    ):
        assert isinstance(tracing.otlp_credentials(settings), grpc.ChannelCredentials)
    with pytest.raises(ValidationError, match="otlp_insecure: false"):
        ObservabilitySettings(otlp_certificate_file=ca)
    with pytest.raises(ValidationError, match="go together"):
        ObservabilitySettings(otlp_insecure=False, otlp_client_certificate_file=ca)
    with pytest.raises(ValidationError):
        ObservabilitySettings(trace_sample_ratio=1.5)
