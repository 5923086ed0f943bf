"""A peer that stops answering without closing its connection (a partition, a host that lost
power) fails the calls open on it UNAVAILABLE once a keepalive ping goes unanswered, instead of
leaving them to their deadlines. Real gRPC on loopback through a TCP relay that can go silent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from test_relay import METHOD, Core  # echoes each request reversed, holds b"hold"

from flotilla.common.peer import GrpcPeer
from flotilla.common.relay import RelayServicer
from flotilla.common.server import SERVER_OPTIONS
from flotilla.errors import Unavailable
from tests.waiting import until


class SilentLink:
    """A TCP relay to ``target``; once silenced it forwards nothing either way and closes nothing."""

    def __init__(self, target: tuple[str, int], core: Core) -> None:
        self.target = target
        self.core = core  # the server's: it holds the calls that got through
        self.silenced = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        for reader, writer in ((client_r, server_w), (server_r, client_w)):
            task = asyncio.ensure_future(self._pump(reader, writer))
            self.tasks.add(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            if self.silenced.is_set():
                await asyncio.Event().wait()  # swallow it, and everything after
            writer.write(data)
            await writer.drain()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def link() -> AsyncIterator[SilentLink]:
    core = Core()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers([RelayServicer(core.start, tier="batcher").generic_handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    relay = SilentLink(("127.0.0.1", port), core)
    yield relay
    await relay.stop()
    await server.stop(None)


async def held_call_after_silence(link: SilentLink, **keepalive: float) -> asyncio.Future[bytes]:
    peer: GrpcPeer[None] = GrpcPeer(f"127.0.0.1:{await link.start()}", **keepalive)
    assert await peer.relay.call(METHOD, b"echo", [], 30.0) == b"ohce"  # the stream is up
    held = asyncio.ensure_future(peer.relay.call(METHOD, b"hold", [], 30.0))
    await until(lambda: link.core.held, 5, "the call held by the server")
    link.silenced.set()
    held.add_done_callback(lambda _: asyncio.ensure_future(peer.close()))
    return held


async def test_an_unanswered_ping_fails_the_open_calls_unavailable(link: SilentLink) -> None:
    held = await held_call_after_silence(link, keepalive_s=1.0, keepalive_timeout_s=1.0)
    with pytest.raises(Unavailable, match="unavailable"):
        await asyncio.wait_for(held, 20.0)  # its deadline is 30 s: the keepalive fails it first


async def test_without_keepalive_the_open_call_waits_on_the_silent_peer(link: SilentLink) -> None:
    # The control: the same silence with pings an hour apart leaves the call open.
    held = await held_call_after_silence(link, keepalive_s=3600.0, keepalive_timeout_s=20.0)
    done, _ = await asyncio.wait([held], timeout=4.0)
    assert not done
    held.cancel()
    with contextlib.suppress(asyncio.CancelledError, Unavailable):
        await held
