"""A raw HTTP/2 client (the ``h2`` state machine over an asyncio socket) for the tests of servers'
limits: it opens streams past the server's MAX_CONCURRENT_STREAMS, sends oversized headers, floods
pings, and records what the server answers frame by frame, which no gRPC client does.

A reader task reads all along (a server that stops reading until its answers are read would
otherwise deadlock a client blocked on its own writes)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Sequence
from types import TracebackType

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

READ_BYTES = 1 << 20


def grpc_headers(method: str, metadata: Sequence[tuple[str, str]] = ()) -> list[tuple[bytes, bytes]]:
    """The request headers of a gRPC call to ``method`` (``/pkg.Service/Method``)."""
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", method.encode()), (b":authority", b"test"),
            (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            *((k.encode(), v.encode()) for k, v in metadata)]


class RawH2:
    """One HTTP/2 connection to ``host``:``port``; ``async with`` opens and closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        # Headers go out as literals: hpack's pure-Python Huffman coding takes about a minute for 1 MB.
        self.conn.encoder.encode = functools.partial(self.conn.encoder.encode, huffman=False)  # type: ignore[method-assign]
        self.server_settings: dict[int, int] = {}
        self.events: Counter[str] = Counter()
        """What the server sent: event class names; StreamReset and ConnectionTerminated as
        ``<name>:<error code name>``."""
        self.statuses: Counter[str] = Counter()
        """The grpc-status of each stream the server ended with one (trailers, or trailers only)."""
        self.closed = False
        """The server closed the connection."""
        self.changed = asyncio.Event()
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.reading: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawH2:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.reading = asyncio.create_task(self.read_all())
        self.conn.initiate_connection()
        await self.flush()
        await self.read_until(lambda: bool(self.server_settings), 30)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.reading is not None:
            self.reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reading
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
            try:
                await self.writer.drain()
            except OSError:
                self.closed = True

    def ignore_stream_limit(self) -> None:
        """Open streams as if the server had set no MAX_CONCURRENT_STREAMS (what a hostile client does)."""
        self.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 2**31 - 1
        self.conn.remote_settings.acknowledge()

    def open_stream(self, headers: list[tuple[bytes, bytes]], body: bytes | None = None) -> int:
        """A new stream with ``headers``; with ``body`` (a gRPC message's bytes) it is also ended."""
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, headers, end_stream=False)
        if body is not None:
            self.send_messages(stream, [body])
        return stream

    def send_messages(self, stream: int, messages: Sequence[bytes], *, end: bool = True) -> None:
        """``messages`` (each a gRPC message's bytes) on ``stream``, in one DATA frame; ``end``: the last."""
        framed = b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in messages)
        self.conn.send_data(stream, framed, end_stream=end)

    def ping(self, payload: bytes = b"12345678") -> None:
        self.conn.ping(payload)

    async def read_all(self) -> None:
        """Read and record until the server closes the connection."""
        try:
            while data := await self.reader.read(READ_BYTES):
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._record(event)
                self.changed.set()
                await self.flush()
        except OSError:
            pass
        self.closed = True
        self.changed.set()

    def _record(self, event: h2.events.Event) -> None:
        name = type(event).__name__
        if isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
            name += f":{h2.errors.ErrorCodes(event.error_code).name}"
        elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
            status = dict(event.headers or ()).get(b"grpc-status")
            if status is not None:
                self.statuses[status.decode()] += 1
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.server_settings.update({int(k): v.new_value for k, v in event.changed_settings.items()})
        self.events[name] += 1

    async def read_until(self, condition: Callable[[], bool], timeout_s: float) -> None:
        """Wait until ``condition()`` holds or the server has closed; fail past ``timeout_s``."""
        async def wait() -> None:
            while not condition() and not self.closed:
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(wait(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"not within {timeout_s} s; the server sent {dict(self.events)}") from None
