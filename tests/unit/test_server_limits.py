"""Every Flotilla gRPC server's limits (``server.SERVER_OPTIONS``) on a real in-process server: each
answers with a clear status, and the server goes on serving. The mesh's processes are tested the
same way in tests/integration/test_limits.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import h2.settings
import pytest

from flotilla.common.server import (
    MAX_CONCURRENT_STREAMS,
    MAX_MESSAGE_BYTES,
    MAX_METADATA_BYTES,
    MAX_PING_STRIKES,
    MAX_SEND_MESSAGE_BYTES,
    ServiceServer,
)
from flotilla.common.wire import CONTROL_MESSAGE_BYTES, CONTROLLER_SERVICE
from tests.rawh2 import RawH2, grpc_headers

METHOD = "/t.S/Held"
ECHO = "/t.S/Echo"


class Held:
    """``Held`` calls wait until ``release``; ``Echo`` answers its request."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def held(self, raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.entered += 1
        await self.release.wait()
        return b"ok"

    async def echo(self, raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return raw


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Held]]:
    server = ServiceServer("limits", [], grace_s=0, tier="test")
    held = Held()
    server.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.S", {
        "Held": grpc.unary_unary_rpc_method_handler(held.held),
        "Echo": grpc.unary_unary_rpc_method_handler(held.echo),
    })])
    port = await server.start("127.0.0.1", 0)
    yield port, held
    held.release.set()
    await server.stop()


async def echo(port: int, body: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as ch:
        answer: bytes = await ch.unary_unary(ECHO)(body, metadata=metadata, timeout=60)
        return answer


async def test_a_message_over_the_limit_is_resource_exhausted(served: tuple[int, Held]) -> None:
    port, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await echo(port, b"x" * (MAX_MESSAGE_BYTES + 1))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (raised.value.details() or "")
    assert await echo(port, b"still serving") == b"still serving"


@pytest.mark.parametrize("size", [MAX_METADATA_BYTES + 1, 1024 * 1024])
async def test_metadata_over_the_limit_is_resource_exhausted_every_time(served: tuple[int, Held], size: int) -> None:
    port, _ = served
    for _ in range(3):  # soft and hard limits alike: no call over it gets through
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await echo(port, b"", (("x-filler", "a" * size),))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "metadata size exceeds" in (raised.value.details() or "")
    assert await echo(port, b"ok", (("x-filler", "a" * 1000),)) == b"ok"


async def test_metadata_over_the_limit_from_a_raw_client_is_answered_by_the_server(served: tuple[int, Held]) -> None:
    """Not the gRPC client refusing to send it: the server answers RESOURCE_EXHAUSTED (grpc-status 8)."""
    port, _ = served
    async with RawH2("127.0.0.1", port) as client:
        client.open_stream(grpc_headers(ECHO, [("x-filler", "a" * 1024 * 1024)]), b"")
        await client.flush()
        await client.read_until(lambda: bool(client.statuses), 60)
        assert dict(client.statuses) == {str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]): 1}
    assert await echo(port, b"ok") == b"ok"


async def test_streams_past_the_limit_on_one_connection_are_refused(served: tuple[int, Held]) -> None:
    port, held = served
    async with RawH2("127.0.0.1", port) as client:
        assert client.server_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == MAX_CONCURRENT_STREAMS
        assert client.server_settings[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] == MAX_METADATA_BYTES
        client.ignore_stream_limit()
        excess = 100
        for _ in range(MAX_CONCURRENT_STREAMS + excess):
            client.open_stream(grpc_headers(METHOD), b"")
        await client.flush()
        await client.read_until(lambda: client.events["StreamReset:REFUSED_STREAM"] >= excess, 60)
        assert client.events["StreamReset:REFUSED_STREAM"] == excess
    assert await echo(port, b"ok") == b"ok"


async def test_a_ping_flood_is_answered_goaway(served: tuple[int, Held]) -> None:
    port, _ = served
    async with RawH2("127.0.0.1", port) as client:
        for _ in range(MAX_PING_STRIKES + 3):  # back to back, far more often than MIN_PING_INTERVAL_MS
            client.ping()
            await client.flush()
        await client.read_until(lambda: client.events["ConnectionTerminated:ENHANCE_YOUR_CALM"] > 0, 60)
    assert await echo(port, b"ok") == b"ok"


async def test_the_controller_may_send_the_whole_fleet_and_others_a_bounded_answer() -> None:
    def send_limit(server: ServiceServer) -> int:
        return dict(server.options)["grpc.max_send_message_length"]

    controller = ServiceServer("controller", [CONTROLLER_SERVICE], grace_s=0, tier="controller")
    assert send_limit(controller) == CONTROL_MESSAGE_BYTES
    assert send_limit(ServiceServer("router", [], grace_s=0, tier="router")) == MAX_SEND_MESSAGE_BYTES
