"""The router's HTTP server (uvicorn in the caller's loop) on real sockets: it serves, a stop lets the
request in flight finish and then refuses connections, SO_REUSEPORT is shared only when asked, and a
request's head and body have deadlines and its head a size limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from flotilla.services.router.http_server import MAX_HEAD_BYTES, GuardedHttpToolsProtocol, HttpServer
from flotilla.services.router.kserve.http import Message, Receive, Scope, Send


class SlowApp:
    """Answers ``/slow`` once ``release`` is set (``entered`` says it arrived); anything else at once."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        if scope["path"] == "/slow":
            self.entered.set()
            await self.release.wait()
        body = scope["path"].encode()
        start: Message = {"type": "http.response.start", "status": 200,
                          "headers": [(b"content-length", str(len(body)).encode())]}
        await send(start)
        await send({"type": "http.response.body", "body": body})


async def get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_serves_and_stops_after_the_request_in_flight() -> None:
    app = SlowApp()
    server = HttpServer(app, grace_s=5.0)
    port = await server.start("127.0.0.1", 0)
    assert port > 0
    assert await get(port, "/fast") == (200, b"/fast")
    slow = asyncio.create_task(get(port, "/slow"))
    await app.entered.wait()
    server.drain()
    stopped = asyncio.create_task(server.stop())
    await asyncio.sleep(0)
    assert not slow.done()
    app.release.set()
    assert await slow == (200, b"/slow")  # answered although the stop began first
    await stopped
    with pytest.raises(OSError):
        await get(port, "/fast")


async def test_a_port_is_shared_only_with_reuse_port() -> None:
    first = HttpServer(SlowApp(), grace_s=1.0)
    port = await first.start("127.0.0.1", 0, reuse_port=True)
    try:
        second = HttpServer(SlowApp(), grace_s=1.0)
        await second.start("127.0.0.1", port, reuse_port=True)
        await second.stop()
        with pytest.raises(OSError):
            await HttpServer(SlowApp(), grace_s=1.0).start("127.0.0.1", port)
    finally:
        await first.stop()


# --- the limits uvicorn lacks: a request head's deadline and size, a body's deadline -----------------

SHORT_S = 0.3
"""The head and body deadlines in these tests (10 s and 30 s in service)."""


@pytest.fixture
async def guarded(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[int]:
    """A server with short read deadlines; yields its port."""
    monkeypatch.setattr(GuardedHttpToolsProtocol, "head_timeout_s", SHORT_S)
    monkeypatch.setattr(GuardedHttpToolsProtocol, "body_timeout_s", SHORT_S)
    server = HttpServer(SlowApp(), grace_s=1.0)
    port = await server.start("127.0.0.1", 0)
    yield port
    await server.stop()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a generous bound, not a timing)."""
    return await asyncio.wait_for(reader.read(), 30)


async def test_a_slowloris_head_is_answered_408_and_closed_while_others_are_served(guarded: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded)
    try:
        writer.write(b"GET /fast HTTP/1.1\r\nhost: x\r\n")
        trickled = 0

        async def trickle() -> None:
            nonlocal trickled
            while not writer.is_closing():
                writer.write(b"x")  # one byte of a header that never ends
                trickled += 1
                await asyncio.sleep(SHORT_S / 10)  # duration: the slow client's pace

        sending = asyncio.create_task(trickle())
        assert await get(guarded, "/fast") == (200, b"/fast"), "others are served meanwhile"
        answer = await read_all(reader)
        sending.cancel()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert trickled > 1
    finally:
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_deadline(guarded: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded)
    try:
        assert (await read_all(reader)).startswith(b"HTTP/1.1 408 ")
    finally:
        writer.close()


async def test_a_head_over_the_limit_is_answered_431_and_closed(guarded: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded)
    try:
        writer.write(b"GET /fast HTTP/1.1\r\nhost: x\r\n")
        for i in range(MAX_HEAD_BYTES // 1000 + 2):
            writer.write(f"x-filler-{i}: {'a' * 1000}\r\n".encode())
        writer.write(b"\r\n")
        assert (await read_all(reader)).startswith(b"HTTP/1.1 431 ")
    finally:
        writer.close()
    assert await get(guarded, "/fast") == (200, b"/fast")


async def test_a_body_slower_than_its_deadline_closes_the_connection(guarded: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded)
    try:
        writer.write(b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        assert await read_all(reader) == b"", "closed without an answer: the app sees the client gone"
    finally:
        writer.close()
