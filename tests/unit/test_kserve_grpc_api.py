"""The router's KServe v2 gRPC layer in process (a real aio server with the router's interceptor, a fake
forwarder): routing before parsing, the stream's window, per-request errors, and its end on shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.message import Message
from prometheus_client import REGISTRY

from flotilla.api.kserve import grpc_service_pb2 as pb
from flotilla.api.v1 import controller_pb2, inference_pb2
from flotilla.common.interceptors import CallObserver
from flotilla.common.server import ServiceServer
from flotilla.services.router.forward import TimeRemaining
from flotilla.services.router.kserve.core import UNSERVED, KServeFront, Loader, StatisticsSource
from flotilla.services.router.kserve.grpc_api import KServeHandler
from flotilla.services.router.kserve.wire import encode_bytes_tensor
from flotilla.services.router.routing import ApiKeys
from tests.unit.test_kserve_core import MODEL, UUIDS, FakeFleet, spec
from tests.waiting import until

SERVICE = "/inference.GRPCInferenceService"
KEY = (("authorization", "Bearer k"),)
WAIT_S = 10.0


class HeldRouter:
    """Routes MODEL; holds each call of a uuid in ``held`` until ``release(uuid)``; counts calls in flight."""

    def __init__(self, held: Sequence[str] = ()) -> None:
        self.keys = ApiKeys(["k"])
        self.gates = {u: asyncio.Event() for u in held}
        self.arrived: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0

    def check_key(self, authorization: str | None) -> None:
        self.keys.check(authorization)

    def authorize(self, authorization: str | None, model: str | None) -> None:
        self.keys.check(authorization)

    def scope(self, authorization: str | None) -> Callable[[str], bool]:
        self.keys.check(authorization)
        return lambda model: model != "hidden"

    def check_model(self, model: str | None) -> None:
        from flotilla.errors import ModelNotFound

        if model != MODEL:
            raise ModelNotFound(f"model {model!r} is not served")

    def release(self, image_uuid: str) -> None:
        self.gates[image_uuid].set()

    async def call(
        self, model: str | None, raw: bytes, headers: Sequence[tuple[str, str]], time_remaining: TimeRemaining
    ) -> bytes:
        request = inference_pb2.ClassifyRequest.FromString(raw)
        self.arrived.append(request.image_uuid)
        self.headers.append(dict(headers))
        self.in_flight += 1
        try:
            gate = self.gates.get(request.image_uuid)
            if gate is not None:
                await gate.wait()
        finally:
            self.in_flight -= 1
        return inference_pb2.ClassifyResponse(
            image_uuid=request.image_uuid, classes=[inference_pb2.ClassScore(index=1, label="dog", score=0.9)],
            scores=[0.1, 0.9],
        ).SerializeToString()


@dataclass
class Served:
    channel: grpc.aio.Channel
    handler: KServeHandler


async def serve(
    router: HeldRouter, window: int = 8, fleet: FakeFleet | None = None, loader: Loader | None = None,
    statistics: StatisticsSource | None = None,
) -> tuple[ServiceServer, Served]:
    server = ServiceServer("router", [], grace_s=0, tier="router")  # with the real interceptor
    front = KServeFront(
        router, fleet or FakeFleet(**{MODEL: spec()}), ready=lambda: True, loader=loader, statistics=statistics
    )
    handler = KServeHandler(front, router, CallObserver("router"), window=window)
    server.server.add_generic_rpc_handlers([handler])
    port = await server.start("127.0.0.1", 0)
    return server, Served(grpc.aio.insecure_channel(f"127.0.0.1:{port}"), handler)


@pytest.fixture
async def held() -> AsyncIterator[tuple[HeldRouter, Served]]:
    router = HeldRouter(held=UUIDS[:2])
    server, served = await serve(router, window=2)
    try:
        yield router, served
    finally:
        await served.channel.close()
        await server.stop()


def infer_request(image_uuid: str, request_id: str = "", model: str = MODEL) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="IMAGE_UUID", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes_tensor([image_uuid.encode()]))
    return request


def stream(channel: grpc.aio.Channel, metadata: Sequence[tuple[str, str]] = KEY) -> grpc.aio.StreamStreamCall:
    method = channel.stream_stream(
        f"{SERVICE}/ModelStreamInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    return method(metadata=tuple(metadata), timeout=WAIT_S)


async def read_all(call: grpc.aio.StreamStreamCall) -> list[pb.ModelStreamInferResponse]:
    answers = []
    while (answer := await call.read()) is not grpc.aio.EOF:
        assert isinstance(answer, pb.ModelStreamInferResponse)
        answers.append(answer)
    return answers


async def test_model_infer_is_routed_by_header_or_body_and_answers_raw_tensors() -> None:
    router = HeldRouter()
    server, served = await serve(router)
    infer = served.channel.unary_unary(
        f"{SERVICE}/ModelInfer", request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    counted = {"tier": "router", "method": "ModelInfer", "model": MODEL, "code": "OK"}
    before = REGISTRY.get_sample_value("flotilla_grpc_requests_total", counted) or 0.0
    try:
        answer = await infer(infer_request(UUIDS[0], "r"), metadata=KEY, timeout=WAIT_S)
        assert [(o.name, o.datatype, list(o.shape)) for o in answer.outputs] == [
            ("PROBABILITIES", "FP32", [1, 2]), ("LABELS", "BYTES", [1, 1]),
        ]
        assert answer.raw_output_contents[1] == encode_bytes_tensor([b"dog"])
        assert answer.id == "r" and answer.model_name == MODEL
        # The interceptor counted it under the model the body names (read off the wire, not parsed).
        assert REGISTRY.get_sample_value("flotilla_grpc_requests_total", counted) == before + 1
        assert "authorization" not in router.headers[0]  # credentials stop at the router
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await infer(infer_request(UUIDS[0], model="other"), metadata=KEY, timeout=WAIT_S)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as disagree:
            await infer(infer_request(UUIDS[0], model="other"), metadata=(*KEY, ("x-model-name", MODEL)), timeout=WAIT_S)
        assert disagree.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-model-name" in (disagree.value.details() or "")
        assert len(router.arrived) == 1
    finally:
        await served.channel.close()
        await server.stop()


async def test_a_stream_holds_at_most_its_window_in_flight(held: tuple[HeldRouter, Served]) -> None:
    router, served = held
    call = stream(served.channel)
    for i, image in enumerate(UUIDS[:5]):  # the first two are held; the rest would be answered at once
        await call.write(infer_request(image, str(i)))
    await until(lambda: router.in_flight == 2, WAIT_S, "the first two requests in flight")
    assert router.arrived == UUIDS[:2]  # the window is full: the rest are not read
    router.release(UUIDS[0])
    first = await call.read()
    assert isinstance(first, pb.ModelStreamInferResponse)
    assert first.infer_response.id == "0" and not first.error_message
    router.release(UUIDS[1])
    await call.done_writing()
    rest = [answer.infer_response.id for answer in await read_all(call)]
    assert sorted(rest) == ["1", "2", "3", "4"]
    assert await call.code() == grpc.StatusCode.OK


async def test_a_failed_request_answers_its_error_and_the_stream_goes_on(held: tuple[HeldRouter, Served]) -> None:
    _, served = held
    call = stream(served.channel)
    await call.write(infer_request("not-a-uuid", "bad"))
    await call.write(infer_request(UUIDS[3], "wrong-model", model="other"))
    garbage = pb.ModelInferRequest(model_name=MODEL, id="junk")
    garbage.inputs.add(name="IMAGE_UUID", datatype="BYTES", shape=[1])
    garbage.raw_input_contents.append(b"\x09\x00")  # a length prefix cut short
    await call.write(garbage)
    await call.write(infer_request(UUIDS[4], "good"))
    await call.done_writing()
    answers = {a.infer_response.id: a.error_message for a in await read_all(call)}
    assert answers["good"] == ""
    assert answers["bad"].startswith("[request id: bad] IMAGE_UUID[0]: image_uuid 'not-a-uuid'")
    assert answers["wrong-model"].startswith("[request id: wrong-model] model 'other' is not served")
    assert answers["junk"].startswith("[request id: junk] input IMAGE_UUID: binary BYTES data is truncated")
    assert await call.code() == grpc.StatusCode.OK


async def test_a_request_naming_its_model_overrides_the_streams_header(held: tuple[HeldRouter, Served]) -> None:
    router, served = held
    call = stream(served.channel, metadata=(*KEY, ("x-model-name", "other"), ("x-request-tag", "t")))
    await call.write(infer_request(UUIDS[3], "own", model=MODEL))
    await call.write(infer_request(UUIDS[4], "header's", model=""))
    await call.done_writing()
    answers = {a.infer_response.id: a.error_message for a in await read_all(call)}
    assert answers == {"own": "", "header's": "[request id: header's] model 'other' is not served"}
    assert router.headers == [{"x-request-tag": "t"}]  # the stream's model header is not the request's


async def test_a_stream_without_the_key_ends_unauthenticated(held: tuple[HeldRouter, Served]) -> None:
    router, served = held
    call = stream(served.channel, metadata=())
    await call.write(infer_request(UUIDS[3], "0"))
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
    assert router.arrived == []


async def test_shutting_down_answers_what_was_taken_then_ends_the_stream_unavailable(
    held: tuple[HeldRouter, Served],
) -> None:
    router, served = held
    call = stream(served.channel)
    await call.write(infer_request(UUIDS[0], "taken"))
    await until(lambda: router.in_flight == 1, WAIT_S, "the request in flight")
    served.handler.drain()
    router.release(UUIDS[0])
    answer = await call.read()
    assert isinstance(answer, pb.ModelStreamInferResponse) and answer.infer_response.id == "taken"
    assert await call.code() == grpc.StatusCode.UNAVAILABLE
    assert "send them again" in (await call.details() or "")


async def test_a_body_that_is_not_a_message_is_invalid_argument(held: tuple[HeldRouter, Served]) -> None:
    _, served = held
    for method in ("ModelInfer", "ModelMetadata", "ServerLive"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await served.channel.unary_unary(f"{SERVICE}/{method}")(b"\x0f\xff", metadata=KEY, timeout=WAIT_S)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method


# --- the model repository extension, and Triton's methods the mesh does not serve --------------------------


async def test_repository_index_and_load_and_the_methods_not_served() -> None:
    loads: list[tuple[str, float | None]] = []

    async def loader(model: str, timeout_s: float | None) -> None:
        loads.append((model, timeout_s))

    async def statistics(model: str, timeout_s: float | None) -> list[controller_pb2.ModelRequestStatistics]:
        every = [controller_pb2.ModelRequestStatistics(
            name=name, succeeded_total=4, batches_total=1, success_s_total=0.002,
            batch_sizes=[controller_pb2.BatchSizeCounters(size=4, batches_total=1, compute_s_total=0.001)],
        ) for name in (MODEL, "hidden")]
        return [c for c in every if not model or c.name == model]

    server, served = await serve(
        HeldRouter(), fleet=FakeFleet(**{MODEL: spec(), "unrouted": spec(), "hidden": spec()}), loader=loader,
        statistics=statistics,
    )

    def unary(method: str, response: type[Message]) -> grpc.aio.UnaryUnaryMultiCallable:
        return served.channel.unary_unary(f"{SERVICE}/{method}", request_serializer=lambda m: m.SerializeToString(),
                                          response_deserializer=response.FromString)

    try:
        index = unary("RepositoryIndex", pb.RepositoryIndexResponse)
        every = await index(pb.RepositoryIndexRequest(), metadata=KEY, timeout=WAIT_S)
        assert [(m.name, m.version, m.state) for m in every.models] == [
            (MODEL, "1", "READY"), (MODEL, "2", "READY"), ("unrouted", "1", "UNAVAILABLE"), ("unrouted", "2", "UNAVAILABLE"),
        ]  # one entry per version; "hidden" is outside the key's scope
        assert every.models[2].reason == "model 'unrouted' is not served"
        ready = await index(pb.RepositoryIndexRequest(ready=True), metadata=KEY, timeout=WAIT_S)
        assert {m.name for m in ready.models} == {MODEL}
        load = unary("RepositoryModelLoad", pb.RepositoryModelLoadResponse)
        await load(pb.RepositoryModelLoadRequest(model_name=MODEL), metadata=KEY, timeout=WAIT_S)
        assert loads[0][0] == MODEL and 0 < (loads[0][1] or 0) <= WAIT_S + 1  # the caller's deadline goes with it
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await load(pb.RepositoryModelLoadRequest(model_name="missing"), metadata=KEY, timeout=WAIT_S)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        overridden = pb.RepositoryModelLoadRequest(model_name=MODEL)
        overridden.parameters["config"].string_param = "{}"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await load(overridden, metadata=KEY, timeout=WAIT_S)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED and "flotilla models deploy" in str(refused.value.details())
        assert len(loads) == 1
        stats = unary("ModelStatistics", pb.ModelStatisticsResponse)
        one = await stats(pb.ModelStatisticsRequest(name=MODEL, version="2"), metadata=KEY, timeout=WAIT_S)
        [entry] = one.model_stats
        assert (entry.name, entry.version, entry.inference_count, entry.execution_count) == (MODEL, "2", 4, 1)
        assert (entry.inference_stats.success.count, entry.inference_stats.success.ns) == (4, 2_000_000)
        [batch] = entry.batch_stats  # one batch of 4, its time once
        assert (batch.batch_size, batch.compute_infer.count, batch.compute_infer.ns) == (4, 1, 1_000_000)
        assert (batch.compute_input.count, batch.compute_input.ns, batch.compute_output.ns) == (1, 0, 0)
        every = await stats(pb.ModelStatisticsRequest(), metadata=KEY, timeout=WAIT_S)
        assert [(m.name, m.version) for m in every.model_stats] == [(MODEL, "")]  # "hidden": outside the key's scope
        with pytest.raises(grpc.aio.AioRpcError) as no_version:
            await stats(pb.ModelStatisticsRequest(name=MODEL, version="9"), metadata=KEY, timeout=WAIT_S)
        assert no_version.value.code() == grpc.StatusCode.NOT_FOUND
        for method in UNSERVED:  # any body: the method is refused before it is read
            call = served.channel.unary_unary(f"{SERVICE}/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as unserved:
                await call(b"", metadata=KEY, timeout=WAIT_S)
            assert unserved.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert str(unserved.value.details()).startswith(f"{method}: ") and "Method not found" not in str(unserved.value.details())
            with pytest.raises(grpc.aio.AioRpcError) as no_key:
                await call(b"", timeout=WAIT_S)
            assert no_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await served.channel.close()
        await server.stop()
