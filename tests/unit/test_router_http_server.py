"""The router's HTTP server (uvicorn in the caller's loop) on real sockets: it serves, a stop lets the
request in flight finish and then refuses connections, and SO_REUSEPORT is shared only when asked."""

from __future__ import annotations

import asyncio

import pytest

from flotilla.services.router.http_server import HttpServer
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
