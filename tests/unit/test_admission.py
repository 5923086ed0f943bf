"""AdmissionLimit on a real grpc.aio server over loopback: calls beyond the limit
get RESOURCE_EXHAUSTED at once, naming the limit; health checks are exempt."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flotilla.common.interceptors import AdmissionLimit
from flotilla.common.server import ServiceServer
from flotilla.errors import ModelNotFound
from tests.waiting import until


@pytest.mark.parametrize("intercept", [True, False], ids=["interceptor", "handlers-added-observed"])
async def test_calls_beyond_the_limit_are_rejected_and_the_rest_answered(intercept: bool) -> None:
    release = asyncio.Event()
    admission = AdmissionLimit("test service", 3, "test.max_concurrent_calls")
    server = ServiceServer("test", ["t.S"], grace_s=0, tier="test", admission=admission, intercept=intercept)

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await release.wait()
        return request

    handlers = [grpc.method_handlers_generic_handler("t.S", {"M": grpc.unary_unary_rpc_method_handler(slow)})]
    if intercept:
        server.server.add_generic_rpc_handlers(handlers)
    else:  # the router's way: no interceptor chain, each handler observed as it is added
        server.add_observed(handlers)
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.S/M")
            admitted = [asyncio.ensure_future(call(b"a", timeout=10)) for _ in range(3)]
            await until(lambda: admission.active == 3, 5, "three calls admitted")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"b", timeout=10)
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            release.set()
            assert await asyncio.gather(*admitted) == [b"a"] * 3
            assert await call(b"c", timeout=10) == b"c", "room again once calls finish"
    finally:
        await server.stop()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 3 concurrent calls (test.max_concurrent_calls)" in (caught.value.details() or "")
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert (admission.active, admission.rejected) == (0, 1)


async def test_without_the_interceptor_a_handler_added_observed_still_maps_errors_to_statuses() -> None:
    server = ServiceServer("test", ["t.S"], grace_s=0, tier="test", intercept=False)

    async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ModelNotFound("model 'nope' is not deployed")

    async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("a bug with a secret in it")

    server.add_observed([grpc.method_handlers_generic_handler("t.S", {
        "Refuse": grpc.unary_unary_rpc_method_handler(refuse), "Crash": grpc.unary_unary_rpc_method_handler(crash),
    })])
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary("/t.S/Refuse")(b"", timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as crashed:
                await channel.unary_unary("/t.S/Crash")(b"", timeout=10)
    finally:
        await server.stop()
    assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.NOT_FOUND, "model 'nope' is not deployed")
    assert crashed.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (crashed.value.details() or "")
