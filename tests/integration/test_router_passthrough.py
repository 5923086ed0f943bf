"""The router forwards request bytes without ever parsing them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from flotilla.api.v1 import relay_pb2
from flotilla.common.peer import GrpcPeer
from flotilla.common.relay import RelayServicer
from flotilla.common.server import ServiceServer
from flotilla.pool.pool import EndpointPool
from flotilla.services.router.forward import Forwarder
from flotilla.services.router.routing import ApiKeys, RouteTable
from flotilla.services.router.server import ForwardingHandler
from flotilla.stack.local import LocalStack
from tests.integration.conftest import API_KEY, MODEL

CLASSIFY = "/flotilla.api.v1.ImageClassifier/Classify"
# Not a protobuf message: field 31, wire type 7 does not exist.
NOT_PROTOBUF = b"\xff\xff\xff\xff\x0f raw bytes only a parser would choke on \x00\x01"


class Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 (what the relay calls on an answer)
        return self.data


class RecordingBatcher:
    """A stand-in upstream (a real Relay server) that keeps exactly what reached it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []

    def start(self, frame: relay_pb2.CallFrame) -> asyncio.Future[Raw]:
        assert frame.method == CLASSIFY
        self.bodies.append(frame.request)
        self.headers.append({h.key: h.value for h in frame.headers})
        answer: asyncio.Future[Raw] = asyncio.get_running_loop().create_future()
        answer.set_result(Raw(b"\x00reply bytes, also unparsed\xff"))
        return answer


@pytest.fixture
async def router_to_recorder() -> AsyncIterator[tuple[grpc.aio.Channel, RecordingBatcher]]:
    recorder = RecordingBatcher()
    upstream = grpc.aio.server()
    upstream.add_generic_rpc_handlers([RelayServicer(recorder.start, tier="batcher").generic_handler()])
    upstream_port = upstream.add_insecure_port("127.0.0.1:0")
    await upstream.start()
    address = f"127.0.0.1:{upstream_port}"
    pool = EndpointPool("batcher", {address: GrpcPeer(address)})
    router = ServiceServer("router", [], grace_s=0, tier="router")  # with the real interceptor chain
    router.server.add_generic_rpc_handlers([ForwardingHandler(Forwarder(ApiKeys(["k"]), RouteTable({"m": pool})))])
    router_port = await router.start("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router_port}")
    try:
        yield channel, recorder
    finally:
        await channel.close()
        await router.stop()
        await pool.endpoints[0].client.close()
        await upstream.stop(None)


async def test_router_forwards_bytes_and_routing_headers_verbatim(router_to_recorder) -> None:  # type: ignore[no-untyped-def]
    channel, recorder = router_to_recorder
    reply = await channel.unary_unary(CLASSIFY)(
        NOT_PROTOBUF,
        metadata=(("x-model-name", "m"), ("authorization", "Bearer k"), ("x-request-id", "r-1")),
        timeout=5,
    )
    assert reply == b"\x00reply bytes, also unparsed\xff"
    assert recorder.bodies == [NOT_PROTOBUF]
    headers = recorder.headers[0]
    assert headers["x-model-name"] == "m" and headers["x-request-id"] == "r-1"
    assert "authorization" not in headers  # credentials stop at the router


async def test_router_rejects_on_headers_alone(router_to_recorder) -> None:  # type: ignore[no-untyped-def]
    channel, recorder = router_to_recorder
    call = channel.unary_unary(CLASSIFY)
    with pytest.raises(grpc.aio.AioRpcError) as bad_key:
        await call(NOT_PROTOBUF, metadata=(("x-model-name", "m"), ("authorization", "Bearer nope")), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as no_model:
        await call(NOT_PROTOBUF, metadata=(("authorization", "Bearer k"),), timeout=5)
    assert bad_key.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert no_model.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-model-name" in (no_model.value.details() or "")
    assert recorder.bodies == []


async def test_real_router_passes_unparseable_body_to_the_batcher(stack: LocalStack) -> None:
    """Only the batcher parses: it is the one that rejects the body, naming the message type."""
    assert stack.state is not None
    async with grpc.aio.insecure_channel(stack.state.router) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(CLASSIFY)(
                NOT_PROTOBUF,
                metadata=(("x-model-name", MODEL), ("authorization", f"Bearer {API_KEY}")),
                timeout=10,
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "flotilla.api.v1.ClassifyRequest" in (caught.value.details() or "")


def test_router_module_does_not_import_the_api_messages() -> None:
    """It may follow the control plane (controller_pb2) but never parses request bodies."""
    import ast
    from pathlib import Path

    import flotilla.services.router.server as router_server

    tree = ast.parse(Path(router_server.__file__).read_text())
    from_api = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flotilla.api")
        for alias in node.names
    }
    plain = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert from_api <= {"controller_pb2"}, from_api
    assert not any(name.startswith("flotilla.api") for name in plain), plain


def test_generic_grpc_tools_read_the_routers_services_by_reflection(stack: LocalStack) -> None:
    """What grpcurl and grpc_cli do: list the router's services and read Classify's messages, with no proto."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    assert stack.state is not None
    with grpc.insecure_channel(stack.state.router) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"flotilla.api.v1.ImageClassifier", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services, services
        pool = DescriptorPool(database)
        classify = pool.FindServiceByName("flotilla.api.v1.ImageClassifier").methods_by_name["Classify"]
        kserve = pool.FindServiceByName("inference.GRPCInferenceService").methods_by_name
    assert classify.input_type.full_name == "flotilla.api.v1.ClassifyRequest"
    assert "image_uuid" in classify.input_type.fields_by_name
    assert classify.output_type.full_name == "flotilla.api.v1.ClassifyResponse"
    # KServe v2 (built in a descriptor pool of its own) is described too, its stream included.
    assert kserve["ModelInfer"].input_type.full_name == "inference.ModelInferRequest"
    assert "raw_input_contents" in kserve["ModelInfer"].input_type.fields_by_name
    assert kserve["ModelStreamInfer"].output_type.full_name == "inference.ModelStreamInferResponse"
    assert kserve["ModelConfig"].output_type.fields_by_name["config"].message_type.full_name == "inference.ModelConfig"
