"""The preprocess worker's HTTP/1.1 client (flotilla.services.preprocess.http_client) against small real servers on
127.0.0.1: each framing of a body, limits, errors, keep-alive and its failures, the connection cap,
timeouts, cancellation and close, POST bodies, the answer's header block, the connections' liveness
options; and the answer parser fed a byte at a time."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flotilla.services.preprocess.http_client import (
    HEAD_MAX_BYTES,
    BodyTooLarge,
    ConnectionDropped,
    HttpAnswer,
    HttpConnectionPool,
    HttpProtocolError,
    IncompleteBody,
    _Connection,
    header_value,
)

HEADERS = {"Host": "store", "x-test": "1"}


def ok(body: bytes, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"HTTP/{version} 200 OK", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailer + b"\r\n"


@dataclass
class Step:
    """One answer: ``data`` sent, then the connection kept ("keep"), closed ("close"), reset ("reset"),
    or left open with nothing more sent ("hang"); sent once ``gate`` is set, when there is one."""

    data: bytes = b""
    then: str = "keep"
    gate: asyncio.Event | None = None


class Server:
    """Answers each request (a header block) with the next step (an object of 10 bytes when none are left)."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.requests: list[bytes] = []
        self.came = asyncio.Event()  # set as each request comes
        self.connections = self.open = self.most_open = 0
        self.ended: asyncio.Queue[int] = asyncio.Queue()  # a connection's number when it ended
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        self.connections += 1
        number = self.connections
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    declared = header_value(head, b"content-length")
                    self.requests.append(head + (await reader.readexactly(int(declared)) if declared else b""))
                    self.came.set()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client closed it
                step = self.steps.pop(0) if self.steps else Step(ok(b"0123456789"))
                if step.gate is not None:
                    await step.gate.wait()
                writer.write(step.data)
                await writer.drain()
                if step.then == "close":
                    return
                if step.then == "reset":
                    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if step.then == "hang":
                    await reader.read()  # until the client closes it
                    return
        except asyncio.CancelledError:
            pass  # the test is over (ending quietly: asyncio logs a connection task's cancellation)
        finally:
            self.open -= 1
            writer.close()
            self.ended.put_nowait(number)

    async def requests_came(self, count: int) -> None:
        while len(self.requests) < count:
            self.came.clear()
            await asyncio.wait_for(self.came.wait(), 5.0)

    async def client_closed(self) -> int:
        return await asyncio.wait_for(self.ended.get(), 5.0)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    running = Server()
    listener = await asyncio.start_server(running.serve, "127.0.0.1", 0)
    running.port = listener.sockets[0].getsockname()[1]
    try:
        yield running
    finally:
        listener.close()
        for task in running.tasks:
            task.cancel()
        await asyncio.gather(*running.tasks, return_exceptions=True)


@pytest.fixture
async def pool(server: Server) -> AsyncIterator[HttpConnectionPool]:
    connections = HttpConnectionPool("127.0.0.1", server.port, timeout_s=5.0)
    try:
        yield connections
    finally:
        connections.close()
        await asyncio.sleep(0)


async def get(pool: HttpConnectionPool, max_bytes: int = 1 << 20, **kwargs: int) -> HttpAnswer:
    """A GET's answer without its header block (the tests that read headers call the pool themselves)."""
    return bare(await pool.get("/images/a.jpg", HEADERS, max_bytes=max_bytes, **kwargs))


def bare(answer: HttpAnswer) -> HttpAnswer:
    return answer._replace(head=b"")


# -- bodies -----------------------------------------------------------------------------------


async def test_a_sized_body_comes_back_whole_over_one_kept_connection(server: Server, pool: HttpConnectionPool) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB: many reads straight into the body
    server.steps = [Step(ok(b"small")), Step(ok(big)), Step(ok(b""))]
    assert await get(pool, 2 << 20) == HttpAnswer(200, bytearray(b"small"))
    assert (await get(pool, 2 << 20)).body == big
    assert (await get(pool, 2 << 20)).body == b""
    assert server.connections == 1
    assert server.requests[0] == b"GET /images/a.jpg HTTP/1.1\r\nHost: store\r\nx-test: 1\r\n\r\n"


async def test_a_body_at_the_limit_is_read_and_one_declared_over_it_is_refused_unread(
    server: Server, pool: HttpConnectionPool
) -> None:
    server.steps = [Step(ok(b"x" * 100)), Step(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\nxx", "hang")]
    assert len((await get(pool, 100)).body) == 100
    with pytest.raises(BodyTooLarge) as refused:
        await get(pool, 100)  # the answer never sends its body: it is refused from the header block
    assert refused.value.declared == 1_000_000_000
    assert await server.client_closed() == 1  # not reused
    assert (await get(pool, 100)).body == b"0123456789"
    assert server.connections == 2


async def test_a_chunked_body_is_decoded_with_extensions_and_trailers(server: Server, pool: HttpConnectionPool) -> None:
    body = chunked(b"hello ", b"chunked " * 5000, b"world", trailer=b"X-Checksum: abc\r\nX-More: 1\r\n")
    body = body.replace(b"\r\n5\r\n", b"\r\n5;name=value\r\n", 1)  # a chunk extension
    server.steps = [Step(body), Step(chunked())]
    assert (await get(pool)).body == b"hello " + b"chunked " * 5000 + b"world"
    assert (await get(pool)).body == b""
    assert server.connections == 1  # a chunked answer leaves the connection in step


async def test_a_chunked_body_over_the_limit_is_refused_as_it_grows(server: Server, pool: HttpConnectionPool) -> None:
    server.steps = [Step(chunked(b"x" * 60, b"y" * 60))]
    with pytest.raises(BodyTooLarge) as refused:
        await get(pool, 100)
    assert refused.value.declared is None
    assert await server.client_closed() == 1


async def test_a_body_ended_by_the_close_is_read_to_the_end_and_its_connection_not_reused(
    server: Server, pool: HttpConnectionPool
) -> None:
    server.steps = [Step(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n\r\n" + b"z" * 70000, "close")]
    assert (await get(pool)).body == b"z" * 70000
    assert (await get(pool)).body == b"0123456789"
    assert server.connections == 2


async def test_a_body_ended_by_the_close_over_the_limit_is_refused(server: Server, pool: HttpConnectionPool) -> None:
    server.steps = [Step(b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 500, "hang")]
    with pytest.raises(BodyTooLarge):
        await get(pool, 100)
    assert await server.client_closed() == 1


# -- error answers --------------------------------------------------------------------------------


async def test_an_error_answer_comes_back_with_its_body_and_keeps_the_connection(
    server: Server, pool: HttpConnectionPool
) -> None:
    missing = b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code></Error>"
    server.steps = [Step(ok(missing).replace(b"200 OK", b"404 Not Found")), Step(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n\r\n")]
    assert await get(pool, 10) == HttpAnswer(404, bytearray(missing))  # max_bytes is for a 2xx body only
    assert await get(pool, 10) == HttpAnswer(503, bytearray())
    assert (await get(pool)).status == 200
    assert server.connections == 1


async def test_an_error_body_is_cut_at_its_limit_and_the_connection_closed(server: Server, pool: HttpConnectionPool) -> None:
    server.steps = [Step(ok(b"<Error><Code>SlowDown</Code></Error>" + b" " * 5000).replace(b"200", b"503"), "hang")]
    answer = await get(pool, max_error_bytes=40)
    assert answer == HttpAnswer(503, bytearray(b"<Error><Code>SlowDown</Code></Error>    "), truncated=True)
    assert await server.client_closed() == 1


async def test_a_post_sends_its_buffers_as_one_body_and_the_answer_keeps_its_header_block(
    server: Server, pool: HttpConnectionPool
) -> None:
    tensor = memoryview(bytes(range(256)) * 300)  # a buffer, sent as it is after the JSON
    server.steps = [Step(ok(b"{}", "Inference-Header-Content-Length: 2"))]
    answer = await pool.post("/v2/models/m/infer", {"Content-Type": "application/octet-stream"},
                             [b'{"inputs":[]}', tensor], max_bytes=1 << 10)
    assert (answer.status, answer.body) == (200, bytearray(b"{}"))
    assert header_value(answer.head, b"inference-header-content-length") == b"2"
    assert header_value(answer.head, b"x-absent") is None
    request = server.requests[0]
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v2/models/m/infer HTTP/1.1\r\n")
    assert header_value(head, b"content-length") == str(13 + len(tensor)).encode()
    assert body == b'{"inputs":[]}' + bytes(tensor)
    # An empty POST still says it has no body; a GET says nothing.
    await pool.post("/v2/systemsharedmemory/region/r/unregister", {}, [], max_bytes=1 << 10)
    await get(pool)
    assert header_value(server.requests[1], b"content-length") == b"0"
    assert header_value(server.requests[2], b"content-length") is None
    assert server.connections == 1


async def test_liveness_sets_keepalive_and_a_user_timeout_on_every_connection(server: Server) -> None:
    connections = HttpConnectionPool("127.0.0.1", server.port, timeout_s=5.0, liveness_s=6.0)
    try:
        await connections.get("/", HEADERS, max_bytes=1 << 10)
        [sock] = connections.idle_sockets()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 6000
    finally:
        connections.close()


# -- keep-alive ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [ok(b"abc", "Connection: close"), ok(b"abc", version="1.0")], ids=["close", "1.0"])
async def test_connection_close_and_http_1_0_answers_end_their_connection(
    server: Server, pool: HttpConnectionPool, answer: bytes
) -> None:
    server.steps = [Step(answer, "hang")]
    assert (await get(pool)).body == b"abc"
    assert await server.client_closed() == 1
    assert (await get(pool)).body == b"0123456789"
    assert server.connections == 2


async def test_bytes_after_an_answer_take_its_connection_out_of_use(server: Server, pool: HttpConnectionPool) -> None:
    server.steps = [Step(ok(b"abc") + b"HTTP/1.1 200 OK\r\n", "hang")]
    assert (await get(pool)).body == b"abc"
    assert await server.client_closed() == 1
    assert (await get(pool)).body == b"0123456789"


@pytest.mark.parametrize("then", ["close", "reset"])
async def test_a_kept_connection_the_server_dropped_is_replaced_once(
    server: Server, pool: HttpConnectionPool, then: str
) -> None:
    assert (await get(pool)).status == 200
    server.steps = [Step(b"", then)]  # the kept connection ends as the next GET comes
    assert (await get(pool)).body == b"0123456789"
    assert server.connections == 2
    server.steps = [Step(b"", then), Step(b"", then)]  # on the fresh one too: that is reported
    with pytest.raises(ConnectionDropped) as dropped:
        await get(pool)
    assert dropped.value.before_answer
    assert server.connections == 3


async def test_a_fresh_connection_dropped_before_the_answer_is_reported(server: Server, pool: HttpConnectionPool) -> None:
    server.steps = [Step(b"HTTP/1.1 200", "close")]
    with pytest.raises(ConnectionDropped) as dropped:
        await get(pool)
    assert not dropped.value.before_answer
    assert isinstance(dropped.value, ConnectionError)
    assert server.connections == 1


@pytest.mark.parametrize(
    "answer", [ok(b"x" * 1000)[:-990], chunked(b"x" * 1000)[:-500]], ids=["sized", "chunked"]
)
@pytest.mark.parametrize("then", ["close", "reset"])
async def test_a_connection_broken_inside_the_body_fails_the_get(
    server: Server, pool: HttpConnectionPool, answer: bytes, then: str
) -> None:
    assert (await get(pool)).status == 200  # a kept connection: no second try either
    server.steps = [Step(answer, then)]
    with pytest.raises(IncompleteBody, match="the connection closed after"):
        await get(pool)
    assert server.connections == 1


async def test_unreachable_is_an_os_error() -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    connections = HttpConnectionPool("127.0.0.1", port, timeout_s=2.0)
    with pytest.raises(ConnectionRefusedError):
        await get(connections)
    connections.close()


# -- limits, timeouts, cancellation, close ---------------------------------------------------------------


async def test_at_most_max_connections_are_open_and_later_gets_wait(server: Server) -> None:
    gate = asyncio.Event()
    server.steps = [Step(ok(b"%d" % i), gate=gate) for i in range(6)]
    connections = HttpConnectionPool("127.0.0.1", server.port, max_connections=2, timeout_s=5.0)
    gets = [asyncio.create_task(get(connections)) for _ in range(6)]
    await server.requests_came(2)
    assert not any(g.done() for g in gets)
    gate.set()
    assert sorted(bytes(answer.body) for answer in await asyncio.gather(*gets)) == [b"%d" % i for i in range(6)]
    assert server.connections == 2 and server.most_open == 2
    connections.close()


async def test_a_store_that_never_answers_times_out_and_the_connection_is_closed(server: Server) -> None:
    connections = HttpConnectionPool("127.0.0.1", server.port, timeout_s=0.2)
    server.steps = [Step(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nxx", "hang")]
    with pytest.raises(TimeoutError):
        await get(connections)
    assert await server.client_closed() == 1
    assert (await get(connections)).body == b"0123456789"
    connections.close()


async def test_a_get_waiting_for_a_connection_times_out_too(server: Server) -> None:
    connections = HttpConnectionPool("127.0.0.1", server.port, max_connections=1, timeout_s=0.2)
    server.steps = [Step(b"", "hang")]
    first = asyncio.create_task(get(connections))
    await server.requests_came(1)
    with pytest.raises(TimeoutError):
        await get(connections)  # never had a connection
    with pytest.raises(TimeoutError):
        await first
    assert server.connections == 1
    assert (await get(connections)).body == b"0123456789"
    connections.close()


async def test_a_connect_that_hangs_times_out_by_the_connect_timeout() -> None:
    full = socket.create_server(("127.0.0.1", 0), backlog=0)  # never accepts: once its queue is full,
    fillers = []  # the kernel drops further SYNs and connecting hangs
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(full.getsockname())
            fillers.append(filler)
        connections = HttpConnectionPool("127.0.0.1", full.getsockname()[1], timeout_s=30.0, connect_timeout_s=0.2)
        started_s = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await get(connections)
        assert asyncio.get_running_loop().time() - started_s < 5.0
    finally:
        for filler in fillers:
            filler.close()
        full.close()


async def test_a_get_cancelled_mid_answer_closes_its_connection(server: Server, pool: HttpConnectionPool) -> None:
    server.steps = [Step(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nxx", "hang")]
    fetch = asyncio.create_task(get(pool))
    await server.requests_came(1)
    fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch
    assert await server.client_closed() == 1
    assert (await get(pool)).body == b"0123456789"
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer, error",
    [
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * HEAD_MAX_BYTES + b"\r\n\r\n", "header block over 65536 bytes"),
        (b"ICY 200 OK\r\nContent-Length: 0\r\n\r\n", "malformed status line b'ICY 200 OK'"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx", "more than one"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size line b'zz'"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxy\r\n", "chunk data not followed by CRLF"),
    ],
    ids=["head-too-large", "status-line", "status-code", "length", "two-lengths", "chunk-size", "chunk-end"],
)
async def test_a_malformed_answer_is_a_protocol_error_and_closes_the_connection(
    server: Server, pool: HttpConnectionPool, answer: bytes, error: str
) -> None:
    server.steps = [Step(answer, "hang")]
    with pytest.raises(HttpProtocolError, match=error):
        await get(pool)
    assert await server.client_closed() == 1


async def test_close_closes_idle_connections_and_in_flight_ones_when_they_finish(server: Server) -> None:
    connections = HttpConnectionPool("127.0.0.1", server.port, timeout_s=5.0)
    await asyncio.gather(get(connections), get(connections))  # two idle connections
    gate = asyncio.Event()
    server.steps = [Step(ok(b"late"), gate=gate)]
    fetch = asyncio.create_task(get(connections))  # takes one of them
    await server.requests_came(3)
    connections.close()
    assert await server.client_closed() in (1, 2)  # the idle one
    gate.set()
    assert (await fetch).body == b"late"
    assert await server.client_closed() in (1, 2)  # the in-flight one, once its answer came
    with pytest.raises(RuntimeError, match="closed"):
        await get(connections)


async def test_an_interim_answer_is_skipped_and_a_host_header_added(server: Server, pool: HttpConnectionPool) -> None:
    server.steps = [Step(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after"))]
    assert (await pool.get("/k", {}, max_bytes=10)).body == b"after"
    assert server.requests[0] == f"GET /k HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()
    with pytest.raises(ValueError, match="line break"):
        await pool.get("/k", {"x-evil": "a\r\nx-injected: 1"}, max_bytes=10)


async def test_a_get_over_tls(tmp_path: Path) -> None:
    # A self-signed certificate for 127.0.0.1, made by the openssl command line (Debian's base).
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"), "-days", "1",
         "-subj", "/CN=flotilla test", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_context = ssl.create_default_context(cafile=tmp_path / "cert.pem")
    running = Server()
    big = bytes(range(256)) * 1000
    running.steps = [Step(ok(big)), Step(chunked(b"tls", b"!"))]
    listener = await asyncio.start_server(running.serve, "127.0.0.1", 0, ssl=server_context)
    port = listener.sockets[0].getsockname()[1]
    connections = HttpConnectionPool("127.0.0.1", port, secure=True, ssl_context=client_context, timeout_s=5.0)
    try:
        assert (await get(connections)).body == big
        assert (await get(connections)).body == b"tls!"
        assert running.connections == 1
        with pytest.raises(ssl.SSLCertVerificationError):  # the system's CAs do not trust it
            await get(HttpConnectionPool("127.0.0.1", port, secure=True, timeout_s=5.0))
    finally:
        connections.close()
        listener.close()
        for task in running.tasks:
            task.cancel()
        await asyncio.gather(*running.tasks, return_exceptions=True)


# -- the parser, fed a byte (or a few) at a time ------------------------------------------------------------


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def feed(data: bytes, step: int, max_bytes: int = 1 << 20) -> tuple[asyncio.Future[HttpAnswer], _Transport]:
    """The answer to a GET on a connection given ``data`` in pieces of ``step`` bytes (then the connection ends)."""
    connection, transport = _Connection(), _Transport()
    connection.connection_made(transport)
    answer = connection.request(b"GET / HTTP/1.1\r\n\r\n", max_bytes, 64, asyncio.get_running_loop().time() + 60)
    for at in range(0, len(data), step):
        piece = data[at : at + step]
        while piece:
            buffer = connection.get_buffer(-1)
            n = min(len(buffer), len(piece))
            buffer[:n] = piece[:n]
            connection.buffer_updated(n)
            piece = piece[n:]
    if not answer.done():
        connection.connection_lost(None)
    return answer, transport


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
async def test_answers_split_anywhere_are_parsed_alike(step: int) -> None:
    body = bytes(range(256)) * 3
    cases = [
        ok(body),
        chunked(body[:100], body[100:], trailer=b"T: 1\r\n").replace(b"\r\n64\r\n", b"\r\n64 ; a=b\r\n"),
        b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n" + ok(body, "connection: Keep-Alive"),
        ok(body, "transfer-encoding: chunked").replace(b"Content-Length: 768\r\n", b"")[:-len(body)]
        + chunked(body)[len(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"):],
    ]
    for data in cases:
        answer, transport = feed(data, step)
        assert answer.done() and bare(answer.result()) == HttpAnswer(200, bytearray(body)), data[:60]
        assert not transport.closing
    answer, transport = feed(ok(body)[:-1], step)
    assert isinstance(answer.exception(), IncompleteBody)
    answer, transport = feed(ok(body)[:-len(body) - 1], step)
    assert isinstance(answer.exception(), ConnectionDropped)
    answer, transport = feed(ok(body, version="1.0"), step)
    assert answer.result().body == body and transport.closing
    answer, transport = feed(chunked(body), step, max_bytes=len(body) - 1)
    assert isinstance(answer.exception(), BodyTooLarge) and transport.closing
