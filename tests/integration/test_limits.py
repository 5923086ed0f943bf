"""The mesh's limits on the stack's real processes: each answers with a clear status instead of
exhausting memory, and the process goes on serving (docs/operations.md, "Limits").

A 100 MB Classify body to the router and to a batcher (a router is not the only caller on the
network), 1 MB of metadata, 10 000 streams on one connection, a ping flood, a slowloris client on the
HTTP port, HTTP bodies and heads over their limits. No timings beyond generous outer bounds; every socket and
channel is closed by the test that opened it.
"""

from __future__ import annotations

import asyncio
import socket

import grpc
import httpx
import psutil
import pytest

from flotilla.clients.client import FlotillaClient
from flotilla.common.server import MAX_CONCURRENT_STREAMS, MAX_MESSAGE_BYTES, MAX_PING_STRIKES
from flotilla.common.wire import AUTH_HEADER, CLASSIFY_METHOD, MODEL_HEADER
from flotilla.services.router.http_server import HEAD_TIMEOUT_S, MAX_HEAD_BYTES
from flotilla.services.router.kserve.http import MAX_BODY_BYTES
from flotilla.stack.local import LocalStack
from tests.integration.conftest import API_KEY, MODEL, sample
from tests.rawh2 import RawH2, grpc_headers

HUGE_BYTES = 100 * 1024 * 1024
METADATA = ((AUTH_HEADER, f"Bearer {API_KEY}"), (MODEL_HEADER, MODEL))
STREAMS = 10_000
HELD_STREAMS_RSS_BYTES = 512 * 1024 * 1024
"""What 10 000 streams on one connection may add to the router's memory at most, a generous bound:
MAX_CONCURRENT_STREAMS of them are held, the rest refused (measured: +89 MB for the 4096 held)."""
ONE_MESSAGE_RSS_BYTES = 64 * 1024 * 1024
"""What a refused 100 MB message may add to a process's memory at most (measured: under 1 MB; it is
refused from its length prefix, never buffered whole)."""


def rss(pid: int | None) -> int:
    assert pid is not None
    return int(psutil.Process(pid).memory_info().rss)


async def classify_raw(address: str, body: bytes, metadata: tuple[tuple[str, str], ...] = METADATA) -> grpc.StatusCode:
    """A Classify call with ``body`` as it is (no client-side limit): its status."""
    options = [("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        try:
            await channel.unary_unary(CLASSIFY_METHOD)(body, metadata=metadata, timeout=120)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def serves(client: FlotillaClient) -> None:
    uuid = await client.upload(sample("coffee.jpg"))
    assert (await client.classify(uuid, MODEL, timeout_s=60)).classes[0].label == "espresso"


@pytest.mark.parametrize("tier", ["router", "batcher"])
async def test_a_100_mb_message_is_resource_exhausted_and_the_process_serves_on(
    stack: LocalStack, client: FlotillaClient, tier: str
) -> None:
    process = stack.router if tier == "router" else stack.batcher_processes()[0]
    assert process is not None
    before = rss(process.pid)
    assert await classify_raw(process.address, b"\x0a" * HUGE_BYTES) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rss(process.pid) - before < ONE_MESSAGE_RSS_BYTES
    assert await classify_raw(process.address, b"\x0a" * (MAX_MESSAGE_BYTES + 1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert process.alive()
    await serves(client)


async def test_1_mb_of_metadata_is_resource_exhausted_and_the_router_serves_on(
    stack: LocalStack, client: FlotillaClient
) -> None:
    assert stack.state is not None
    filler = ("x-filler", "a" * 1024 * 1024)
    assert await classify_raw(stack.state.router, b"", (*METADATA, filler)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    host, port = stack.state.router.rsplit(":", 1)
    async with RawH2(host, int(port)) as connection:  # the router answers it, not the client library
        connection.open_stream(grpc_headers(CLASSIFY_METHOD, [*METADATA, filler]), b"")
        await connection.flush()
        await connection.read_until(lambda: bool(connection.statuses), 60)
        assert dict(connection.statuses) == {str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]): 1}
    await serves(client)


async def test_10000_streams_on_one_connection_are_held_to_the_limit_and_each_ends_with_a_status(
    stack: LocalStack, client: FlotillaClient
) -> None:
    """A client that ignores MAX_CONCURRENT_STREAMS: the streams past it are refused, the router holds the
    rest (each a Classify whose body never comes) until their deadline, and its memory stays bounded."""
    router = stack.router
    assert router is not None
    host, port = router.address.rsplit(":", 1)
    before = rss(router.pid)
    headers = grpc_headers(CLASSIFY_METHOD, [*METADATA, ("grpc-timeout", "5S")])
    async with RawH2(host, int(port)) as connection:
        connection.ignore_stream_limit()
        for _ in range(STREAMS):
            connection.open_stream(headers)  # no body: the router waits for it until the deadline
        await connection.flush()
        refused = STREAMS - MAX_CONCURRENT_STREAMS

        def all_ended() -> bool:
            return connection.events["StreamReset:REFUSED_STREAM"] + sum(connection.statuses.values()) >= STREAMS

        await connection.read_until(all_ended, 180)
        held_rss = rss(router.pid)
        assert connection.events["StreamReset:REFUSED_STREAM"] == refused, dict(connection.events)
        assert set(connection.statuses) <= {str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])}, connection.statuses
        assert sum(connection.statuses.values()) == MAX_CONCURRENT_STREAMS
    assert held_rss - before < HELD_STREAMS_RSS_BYTES, (before, held_rss)
    assert router.alive()
    await serves(client)


async def test_a_ping_flood_is_answered_goaway_and_the_router_serves_on(
    stack: LocalStack, client: FlotillaClient
) -> None:
    router = stack.router
    assert router is not None
    host, port = router.address.rsplit(":", 1)
    async with RawH2(host, int(port)) as connection:
        for _ in range(MAX_PING_STRIKES + 3):  # back to back, far more often than MIN_PING_INTERVAL_MS
            connection.ping()
            await connection.flush()
        await connection.read_until(lambda: connection.events["ConnectionTerminated:ENHANCE_YOUR_CALM"] > 0, 60)
    await serves(client)


def http_address(stack: LocalStack) -> tuple[str, int]:
    assert stack.state is not None and stack.state.router_http
    host, port = stack.state.router_http.rsplit(":", 1)
    return host, int(port)


async def test_a_slowloris_client_is_closed_within_the_head_timeout_while_others_are_served(
    stack: LocalStack,
) -> None:
    host, port = http_address(stack)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-slow: ")
        trickled = asyncio.Event()

        async def trickle() -> None:
            while not writer.is_closing():
                writer.write(b"a")  # a header byte now and then, never the end of the head
                trickled.set()
                await asyncio.sleep(HEAD_TIMEOUT_S / 20)  # duration: the slow client's pace

        sending = asyncio.create_task(trickle())
        await trickled.wait()
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as other:
            assert (await other.get("/v2/health/live", timeout=30)).status_code == 200, "others are served meanwhile"
        answer = await asyncio.wait_for(reader.read(), HEAD_TIMEOUT_S * 6)  # a generous outer bound
        sending.cancel()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
    finally:
        writer.close()


async def test_http_bodies_over_the_limit_are_413_and_heads_over_the_limit_431(stack: LocalStack) -> None:
    host, port = http_address(stack)
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    path = f"/v2/models/{MODEL}/infer"
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=60) as http:
        declared = await http.post(path, content=b" " * (MAX_BODY_BYTES + 1), headers=headers)
        assert declared.status_code == 413, declared.text

        async def chunks() -> object:  # no content-length: the server counts what arrives
            for _ in range(MAX_BODY_BYTES // 65536 + 2):
                yield b" " * 65536

        chunked = await http.post(path, content=chunks(), headers=headers)  # type: ignore[arg-type]
        assert chunked.status_code == 413, chunked.text
        big_head = await http.get("/v2/health/live", headers={"x-filler": "a" * (MAX_HEAD_BYTES + 1)})
        assert big_head.status_code == 431
        assert (await http.get("/v2/health/live")).status_code == 200


def test_the_ports_are_still_listening(stack: LocalStack) -> None:
    for process in [stack.router, *stack.batcher_processes()]:
        assert process is not None and process.alive(), process
        host, port = process.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10):
            pass
