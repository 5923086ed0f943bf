"""A minimal asyncio HTTP/1.1 client: the preprocess worker's S3 GETs (one per image) and its
inference calls to Triton replicas (KServe v2 over HTTP, one per batch).

It exists for the client CPU per call. Measured on this project's 2-core machine
against real SeaweedFS with 8 GETs in flight, a 2 KB / 240 KB object cost 40 /
112 client CPU-µs with a prototype of this client against 100 / 235 with
aiohttp, 257 / 509 with ``http.client`` in threads, 171 / 373 with pycurl and
275-420 with obstore (the minio SDK costs more than ``http.client``); this
client, through ``AsyncObjectReader`` (signing included), 44-46 / 108-117.
Against a real Triton replica, a batch of 8 in shared memory cost 40 client
CPU-µs per call with this client against 170-185 with a grpc.aio ModelInfer and
150-165 on a ModelStreamInfer stream (tritonserver: 105-118 against 170-230).
The body of an answer with a Content-Length is received with ``recv_into``
straight into a buffer of that size (``asyncio.BufferedProtocol``): no
per-chunk copies, no stream reader; the header block is searched only for the
status line, Content-Length, Transfer-Encoding and Connection (it comes back
whole, ``HttpAnswer.head``, for the caller's own headers); and the deadline of
a call waiting for its answer is one timer of its connection
(``asyncio.timeout`` around every call cost ~5 µs more).

What it supports: GET and POST (a request body of bytes or buffers, sent
without joining them) over HTTP/1.1 (optionally TLS) to one ``host:port``, up
to ``max_connections`` kept-alive connections reused last-in first-out;
answers framed by Content-Length, ``Transfer-Encoding: chunked`` (extensions
and trailers skipped) or the connection's close, from HTTP/1.1 and 1.0
servers (interim 1xx answers skipped); ``Connection: close``. With
``liveness_s`` every connection has TCP keepalive and a user timeout: a peer
that vanished without a reset (a partition, a host that lost power) breaks
the connection within about that long, not at the call's deadline. Not
supported: pipelining, content codings (the body comes back as sent),
redirects, proxies, ``Expect: 100-continue``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Mapping, Sequence
from typing import NamedTuple, cast

HEAD_MAX_BYTES = 64 << 10
"""The largest header block accepted (also the receive buffer of chunked and close-delimited bodies)."""
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_HEAD, _FIXED, _CHUNKED, _UNTIL_CLOSE = range(4)  # what the connection is receiving


class HttpAnswer(NamedTuple):
    status: int
    body: bytearray
    truncated: bool = False
    """True when an error answer's body was cut at ``max_error_bytes``."""
    head: bytes = b""
    """The answer's header block (status line and headers, up to the blank line)."""


def header_value(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case) in a header block, stripped; None when absent."""
    lower = head.lower()
    found = lower.find(b"\r\n" + name + b":")
    if found < 0:
        return None
    start = found + len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


class HttpProtocolError(Exception):
    """The server's answer is not HTTP this client understands (malformed, or a header block too large)."""


class BodyTooLarge(Exception):
    """A 2xx answer's body is over ``max_bytes``: ``declared`` by its Content-Length, or None when found while read."""

    def __init__(self, max_bytes: int, declared: int | None) -> None:
        size = f"a body of {declared} bytes" if declared is not None else "the body"
        super().__init__(f"{size} is over the limit of {max_bytes} bytes")
        self.declared = declared


class IncompleteBody(Exception):
    """The connection broke after the header block and before the end of the body."""


class ConnectionDropped(ConnectionError):
    """The connection broke before the whole header block came (``before_answer``: before any byte of it)."""

    def __init__(self, message: str, *, before_answer: bool) -> None:
        super().__init__(message)
        self.before_answer = before_answer


class _Connection(asyncio.BufferedProtocol):
    """One connection; at most one request outstanding on it."""

    __slots__ = (
        "transport", "_head", "_view", "_hlen", "_mode", "_waiter", "_status", "_body", "_body_view", "_blen",
        "_cap", "_ok", "_keep", "_cut", "_left", "_trailer", "_answered", "_max_bytes", "_max_error_bytes", "_timer",
        "_answer_head",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._head = bytearray(HEAD_MAX_BYTES)
        self._view = memoryview(self._head)
        self._hlen = 0
        self._mode = _HEAD
        self._waiter: asyncio.Future[HttpAnswer] | None = None
        self._body = bytearray()
        self._body_view: memoryview | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._answer_head = b""
        self._status = self._blen = self._cap = self._left = self._max_bytes = self._max_error_bytes = 0
        self._ok = self._keep = self._cut = self._trailer = self._answered = False

    def request(
        self, data: bytes | Sequence[bytes | memoryview], max_bytes: int, max_error_bytes: int, deadline: float
    ) -> asyncio.Future[HttpAnswer]:
        """Send ``data`` (bytes, or buffers written in one go); the answer, or TimeoutError (and the
        connection closed) at ``deadline`` (the loop's time)."""
        assert self.transport is not None and self._waiter is None
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._timer = loop.call_at(deadline, self._time_out)
        self._max_bytes, self._max_error_bytes, self._answered = max_bytes, max_error_bytes, False
        if isinstance(data, bytes):
            self.transport.write(data)
        else:
            self.transport.writelines(data)
        return waiter

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and self._waiter is None

    def abort(self) -> None:
        self._waiter = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()

    def _time_out(self) -> None:
        self._timer = None
        self._fail(TimeoutError("no whole answer in time"))

    # -- asyncio.BufferedProtocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's (asyncio's or uvloop's)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._mode == _FIXED:
            assert self._body_view is not None  # set with the mode
            return self._body_view[self._blen:]
        return self._view[self._hlen:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._mode == _FIXED:  # the hot path: the body lands in place
            self._blen += nbytes
            if self._blen == len(self._body):
                self._finish(0)
            return
        waiter = self._waiter
        if waiter is None or waiter.done():  # bytes nobody asked for: the connection is out of step
            self.abort()
            return
        self._answered = True
        start = max(self._hlen - 3, 0)
        self._hlen += nbytes
        if self._mode == _HEAD:
            end = self._head.find(b"\r\n\r\n", start, self._hlen)
            while end >= 0 and self._mode == _HEAD and self._waiter is not None:
                self._on_head(end + 4)
                end = self._head.find(b"\r\n\r\n", 0, self._hlen) if self._mode == _HEAD else -1
            if self._mode == _HEAD and self._hlen == HEAD_MAX_BYTES:
                self._fail(HttpProtocolError(f"header block over {HEAD_MAX_BYTES} bytes"))
        elif self._mode == _CHUNKED:
            self._feed_chunked()
        else:
            self._append(self._view[: self._hlen])
            self._hlen = 0

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost settles a pending answer

    def connection_lost(self, exc: Exception | None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._mode == _UNTIL_CLOSE and exc is None:
            self._keep = False
            self._finish(0)
        elif self._mode == _HEAD:
            reason = f" ({exc})" if exc else ""
            self._fail(ConnectionDropped(f"the server closed the connection before answering{reason}",
                                         before_answer=not self._answered))
        else:
            got = self._blen if self._mode == _FIXED else len(self._body)
            whole = f" of {len(self._body)}" if self._mode == _FIXED else ""
            self._fail(IncompleteBody(f"the connection closed after {got}{whole} bytes of the body ({exc or 'EOF'})"))

    # -- the answer ----------------------------------------------------------------

    def _on_head(self, end: int) -> None:
        """Parse the header block in ``_head[:end]`` and set up the body's framing."""
        head = bytes(self._view[:end])
        if head[:7] != b"HTTP/1." or head[8:9] != b" " or not head[9:12].isdigit() or head[12:13] not in (b" ", b"\r"):
            line = head.partition(b"\r")[0][:80]
            self._fail(HttpProtocolError(f"malformed status line {line!r}"))
            return
        status = int(head[9:12])
        extra = self._hlen - end
        if 100 <= status < 200 and status != 101:  # interim answer: the real one follows
            self._view[:extra] = self._view[end : self._hlen]
            self._hlen = extra
            return
        lower = head.lower()
        keep = head[7] == 0x31  # HTTP/1.1; a 1.0 answer ends with the connection
        found = lower.find(b"\r\nconnection:")
        if found >= 0 and b"close" in lower[found + 13 : lower.index(b"\r\n", found + 13)]:
            keep = False
        length: int | None = None
        found = lower.find(b"\r\ncontent-length:")
        if found >= 0:
            value = head[found + 17 : head.index(b"\r\n", found + 17)].strip()
            if not value.isdigit() or len(value) > 18 or lower.find(b"\r\ncontent-length:", found + 17) >= 0:
                self._fail(HttpProtocolError(f"bad Content-Length {value[:40]!r} (or more than one)"))
                return
            length = int(value)
        chunked = False
        found = lower.find(b"\r\ntransfer-encoding:")
        if found >= 0:
            coding = lower[found + 20 : lower.index(b"\r\n", found + 20)].rpartition(b",")[2].strip()
            keep = keep and coding == b"chunked" and length is None  # else read to the close (RFC 9112 6.3)
            chunked, length = coding == b"chunked", None
        if status in (101, 204, 304):
            if status == 101:
                self._fail(HttpProtocolError("the server switched protocols"))
                return
            length = 0
        self._status, self._ok, self._keep, self._cut = status, 200 <= status < 300, keep, False
        self._answer_head = head
        self._cap = self._max_bytes if self._ok else self._max_error_bytes
        if length is not None:
            if length > self._cap:
                if self._ok:
                    self._fail(BodyTooLarge(self._max_bytes, length))  # before reading it
                    return
                length, self._keep, self._cut = self._cap, False, True
            self._body = bytearray(length)
            take = min(extra, length)
            self._body[:take] = self._view[end : end + take]
            self._blen = take
            if take == length:
                self._finish(extra - take)
                return
            self._body_view, self._mode, self._hlen = memoryview(self._body), _FIXED, 0
            return
        self._body, self._left, self._trailer = bytearray(), 0, False
        self._view[:extra] = self._view[end : self._hlen]
        self._hlen = extra
        if chunked:
            self._mode = _CHUNKED
            self._feed_chunked()
        else:
            self._mode, self._keep = _UNTIL_CLOSE, False
            self._append(self._view[:extra])
            self._hlen = 0

    def _feed_chunked(self) -> None:
        """Decode what ``_head[:_hlen]`` holds of a chunked body; keep an incomplete line for later."""
        buf, end, pos = self._head, self._hlen, 0
        while pos < end:
            if self._left > 0:  # inside a chunk's data
                take = min(self._left, end - pos)
                if not self._append(self._view[pos : pos + take]):
                    return
                pos += take
                self._left -= take
                if self._left == 0:
                    self._left = -1  # its CRLF comes next
                continue
            eol = buf.find(b"\r\n", pos, end)
            if eol < 0:
                break
            line = bytes(self._view[pos:eol])
            pos = eol + 2
            if self._left == -1:
                if line:
                    self._fail(HttpProtocolError("chunk data not followed by CRLF"))
                    return
                self._left = 0
            elif self._trailer:
                if not line:  # the end of the trailer section: the body is whole
                    self._finish(end - pos)
                    return
            else:
                size = line.partition(b";")[0].strip()
                if not size or len(size) > 15 or size.translate(None, _HEX_DIGITS):
                    self._fail(HttpProtocolError(f"bad chunk size line {line[:40]!r}"))
                    return
                self._left = int(size, 16)
                self._trailer = self._left == 0
        rest = end - pos
        if rest == HEAD_MAX_BYTES:
            self._fail(HttpProtocolError(f"a chunk size or trailer line over {HEAD_MAX_BYTES} bytes"))
            return
        if pos:
            self._view[:rest] = self._view[pos:end]
        self._hlen = rest

    def _append(self, data: memoryview) -> bool:
        """Add to a chunked or close-delimited body; False when that ended the answer (too large, or cut)."""
        room = self._cap - len(self._body)
        if len(data) <= room:
            self._body += data
            return True
        if self._ok:
            self._fail(BodyTooLarge(self._max_bytes, None))
        else:
            self._body += data[:room]
            self._keep, self._cut = False, True
            self._finish(0)
        return False

    def _finish(self, extra: int) -> None:
        """The answer is whole; ``extra`` bytes came after it (then the connection is out of step)."""
        waiter, body = self._waiter, self._body
        self._waiter, self._mode, self._hlen, self._body = None, _HEAD, 0, bytearray()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._body_view is not None:
            self._body_view.release()  # the caller may resize its body
            self._body_view = None
        if extra or not self._keep:
            assert self.transport is not None  # an answer came on it
            self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(HttpAnswer(self._status, body, self._cut, self._answer_head))

    def _fail(self, exc: Exception) -> None:
        waiter = self._waiter
        self._mode, self._hlen, self._body = _HEAD, 0, bytearray()
        if self._body_view is not None:
            self._body_view.release()
            self._body_view = None
        self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class HttpConnectionPool:
    """Calls to one ``host:port`` over up to ``max_connections`` kept-alive connections
    (TLS when ``secure``: ``ssl_context``, by default the system's trusted CAs).

    Each call is bounded by ``timeout_s`` (waiting for a connection, connecting,
    the whole answer), connecting by ``connect_timeout_s`` (default min(timeout_s,
    2)); TimeoutError past either. A connection is reused only after a whole answer
    that left it in step; a timed-out or cancelled call closes its connection. A call
    on a reused connection that the server had closed (EOF or reset before any byte
    of the answer: the server never read it) is sent once more on a fresh connection,
    so what the pool sends must be safe to repeat (GETs, inference requests).
    """

    def __init__(
        self, host: str, port: int, *, secure: bool = False, max_connections: int = 64, timeout_s: float = 10.0,
        connect_timeout_s: float | None = None, ssl_context: ssl.SSLContext | None = None,
        liveness_s: float | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(timeout_s, 2.0) if connect_timeout_s is None else connect_timeout_s
        self.liveness_s = liveness_s
        """TCP keepalive and user timeout of every connection (None: the system's defaults)."""
        self._ssl = (ssl_context or ssl.create_default_context()) if secure else None
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._closed = False

    async def get(
        self, target: str, headers: Mapping[str, str], *, max_bytes: int, max_error_bytes: int = HEAD_MAX_BYTES
    ) -> HttpAnswer:
        """GET ``target`` (an encoded path and query) with ``headers`` (a Host header is added when missing).

        A 2xx answer's body over ``max_bytes`` raises BodyTooLarge (from its Content-Length before
        it is read); any other answer's body is cut at ``max_error_bytes`` (``truncated``). Raises
        OSError (ConnectionDropped among them) when the GET could not be sent or the connection broke
        before the answer's header block, IncompleteBody when it broke inside the body,
        HttpProtocolError on a malformed answer, TimeoutError.
        """
        return await self.request("GET", target, headers, max_bytes=max_bytes, max_error_bytes=max_error_bytes)

    async def post(
        self, target: str, headers: Mapping[str, str], body: Sequence[bytes | memoryview], *, max_bytes: int,
        max_error_bytes: int = HEAD_MAX_BYTES, timeout_s: float | None = None,
    ) -> HttpAnswer:
        """POST ``body`` (its buffers in order, with their Content-Length) to ``target``; as ``get``."""
        return await self.request(
            "POST", target, headers, body, max_bytes=max_bytes, max_error_bytes=max_error_bytes, timeout_s=timeout_s
        )

    async def request(
        self, method: str, target: str, headers: Mapping[str, str], body: Sequence[bytes | memoryview] = (), *,
        max_bytes: int, max_error_bytes: int = HEAD_MAX_BYTES, timeout_s: float | None = None,
    ) -> HttpAnswer:
        """``method`` ``target`` with ``headers`` and ``body``, within ``timeout_s`` (default the
        pool's); see ``get``."""
        if self._closed:
            raise RuntimeError("the connection pool is closed")
        lines = [f"{method} {target} HTTP/1.1"]
        if "Host" not in headers and "host" not in headers:
            lines.append(f"Host: {self._host_header}")
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if method != "GET":
            lines.append(f"Content-Length: {sum(memoryview(part).nbytes for part in body)}")
        text = "\r\n".join(lines)
        if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1 or target.count(" "):
            raise ValueError(f"a line break in a header, or a space in the target {target!r}")
        head = (text + "\r\n\r\n").encode("ascii")
        request: bytes | list[bytes | memoryview] = head if not body else [head, *body]
        # The deadline is kept by asyncio.timeout_at where the call waits for a slot or a connection, and by a
        # timer of the connection while it waits for the answer: asyncio.timeout around every call cost ~5 µs.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout_s if timeout_s is None else timeout_s)
        if self._slots.locked():
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            fresh = False
            while True:
                connection = None if fresh else self._take_idle()
                reused = connection is not None
                try:
                    if connection is None:
                        async with asyncio.timeout_at(min(deadline, loop.time() + self.connect_timeout_s)):
                            connection = await self._connect()
                    answer = await connection.request(request, max_bytes, max_error_bytes, deadline)
                except ConnectionDropped as exc:
                    assert connection is not None  # only its request raises this
                    connection.abort()
                    if reused and exc.before_answer:  # it was closed while idle: once more on a fresh one
                        fresh = True
                        continue
                    raise
                except BaseException:
                    if connection is not None:
                        connection.abort()  # its answer might still come
                    raise
                if self._closed or not connection.usable:
                    connection.abort()
                else:
                    self._idle.append(connection)
                return answer
        finally:
            self._slots.release()

    def idle_sockets(self) -> list[socket.socket]:
        """The sockets of the kept-alive connections now idle (for observing state: their options)."""
        transports = [c.transport for c in self._idle if c.transport is not None]
        return [t.get_extra_info("socket") for t in transports if t.get_extra_info("socket") is not None]

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                return connection
            connection.abort()
        return None

    async def _connect(self) -> _Connection:
        transport, connection = await asyncio.get_running_loop().create_connection(
            _Connection, self.host, self.port, ssl=self._ssl, server_hostname=self.host if self._ssl else None
        )
        if self.liveness_s is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                set_liveness(sock, self.liveness_s)
        return connection

    def close(self) -> None:
        """Close the idle connections; those in use close when their call ends. Later calls raise RuntimeError."""
        self._closed = True
        while self._idle:
            connection = self._idle.pop()
            if connection.transport is not None:
                connection.transport.close()


def set_liveness(sock: socket.socket, within_s: float) -> None:
    """Make a TCP connection break within about ``within_s`` when its peer vanished without a
    reset: keepalive probes after ``within_s / 2`` idle (an answer awaited counts as idle), and
    data unacknowledged for ``within_s`` (TCP_USER_TIMEOUT) drops it. Linux options; elsewhere
    only SO_KEEPALIVE."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    half = max(1, int(within_s / 2))
    for name, value in (("TCP_KEEPIDLE", half), ("TCP_KEEPINTVL", max(1, half // 2)), ("TCP_KEEPCNT", 2),
                        ("TCP_USER_TIMEOUT", int(within_s * 1000))):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
