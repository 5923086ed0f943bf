"""An error's origin crosses a unary call between tiers: the server's interceptor puts it in the
trailing metadata, ``error_from_rpc`` on the caller's side keeps it (and the message as it came);
a status without one is the called tier's own failure."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from flotilla.common.interceptors import Observe
from flotilla.common.status import error_from_rpc
from flotilla.common.wire import ORIGIN_HEADER, RETRY_AFTER_HEADER
from flotilla.errors import QuotaExceeded, Unavailable

SERVICE = "test.Tier"


async def fail_below(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise Unavailable("Triton at 127.0.0.1:9 is unavailable: connection refused", origin="Triton[m] 127.0.0.1:9")


async def fail_own(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise Unavailable("the worker is shutting down")


async def fail_quota(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise QuotaExceeded("API key 'ci' is over its quota", retry_after_s=0.0421)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[Observe("preprocess")])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Below": grpc.unary_unary_rpc_method_handler(fail_below),
        "Own": grpc.unary_unary_rpc_method_handler(fail_own),
        "Quota": grpc.unary_unary_rpc_method_handler(fail_quota),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    await server.stop(None)


async def call(channel: grpc.aio.Channel, method: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/{method}")(b"")
    return caught.value


async def test_a_failure_from_below_travels_with_its_origin(channel: grpc.aio.Channel) -> None:
    rpc = await call(channel, "Below")
    assert rpc.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(rpc.trailing_metadata() or ())[ORIGIN_HEADER] == "Triton[m] 127.0.0.1:9"
    error = error_from_rpc(rpc, "preprocess worker 127.0.0.1:5")
    assert isinstance(error, Unavailable) and error.origin == "Triton[m] 127.0.0.1:9"
    assert error.message == "Triton at 127.0.0.1:9 is unavailable: connection refused", "the failing part first"


async def test_an_error_with_a_retry_hint_sends_it_in_the_trailing_metadata(channel: grpc.aio.Channel) -> None:
    rpc = await call(channel, "Quota")
    assert rpc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(rpc.trailing_metadata() or ())
    assert trailing[RETRY_AFTER_HEADER] == "42" and ORIGIN_HEADER not in trailing
    assert RETRY_AFTER_HEADER not in dict((await call(channel, "Own")).trailing_metadata() or ())


async def test_the_called_tiers_own_failure_names_no_origin(channel: grpc.aio.Channel) -> None:
    rpc = await call(channel, "Own")
    assert ORIGIN_HEADER not in dict(rpc.trailing_metadata() or ())
    error = error_from_rpc(rpc, "preprocess worker 127.0.0.1:5")
    assert isinstance(error, Unavailable) and error.origin == ""
    assert error.message.startswith("preprocess worker 127.0.0.1:5 is unavailable")
