"""One ``ClassifyStream`` call seen from the client: many classifications in flight on one stream.

    async with client.stream("efficientnet-lite0") as stream:
        results = await asyncio.gather(*(stream.classify(u) for u in uuids))

Each ``classify`` sends one request with an id of this stream's own and
waits for the answer with that id; answers come in any order. A request's
failure raises that request's ``FlotillaError`` (the status a unary call
would raise) and the stream goes on. The stream ends with ``close`` (the
sending side closes, every answer still due arrives, then the router ends
the call) or with the router: then every request still waiting fails with
the stream's status (UNAVAILABLE when the router shut down: those requests
were never taken and can be sent again).

Writes go out one message at a time from one task, in the order the calls
were made; the requests queued while a write was under way go out packed in
the next message (``ClassifyStreamRequest.requests``, up to ``MAX_PACK``),
and the router then packs its answers too: a message costs each side about
what one request does. The client packs only once the router has said it
takes packed requests (``wire.STREAM_PACKING_HEADER`` in the stream's initial
metadata): an older router gets one request a message. When the router's window is full it stops reading and
the writes wait (HTTP/2 flow control), so the callers should bound what they
send (``FlotillaClient.classify_many`` does).

``ReopeningStream`` (what ``classify_many`` uses) keeps one stream open for
many requests and, when that stream ends UNAVAILABLE (a router killed,
restarted or rolled), opens another and sends the requests it failed again,
each until its own deadline: classifying is idempotent, and a router that
drains says so itself ("send them again").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections import deque
from collections.abc import Callable
from types import TracebackType

import grpc

from flotilla.api.v1 import inference_pb2
from flotilla.clients.results import Classification, classification_of
from flotilla.common.status import error_from_rpc
from flotilla.common.wire import STREAM_PACKING_HEADER
from flotilla.errors import Code, DeadlineExceeded, FlotillaError, ResourceExhausted, Unavailable, error_from_code

ANSWER_GRACE_S = 5.0
"""How long past a request's own deadline the client waits for the router's answer to it (the
router answers DEADLINE_EXCEEDED at the deadline; this only guards against a router that is stuck)."""
MAX_TIMEOUT_MS = 2**32 - 1
MAX_PACK = 256
"""The most requests packed into one message (each names a uuid: a few KB in all)."""
REOPEN_BACKOFF_S = 0.05
"""``ReopeningStream``: the first wait before a request goes again on a new stream; it doubles up
to ``REOPEN_MAX_BACKOFF_S`` while streams keep ending."""
REOPEN_MAX_BACKOFF_S = 1.0
REOPEN_CODES = frozenset({Code.UNAVAILABLE, Code.INTERNAL})
"""A stream ended with one of these is opened again by ``ReopeningStream``: the router went away,
or (INTERNAL) a write raced the connection's end, for which grpc.aio ends the call INTERNAL."""

StreamCall = grpc.aio.StreamStreamCall[inference_pb2.ClassifyStreamRequest, inference_pb2.ClassifyStreamResponse]


class ClassifyStream:
    """A ``ClassifyStream`` call open to the router (``FlotillaClient.stream`` opens one)."""

    def __init__(self, call: StreamCall, model: str, router: str, *, default_timeout_s: float) -> None:
        self.model = model
        self.router = router
        self.default_timeout_s = default_timeout_s
        self._call = call
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[inference_pb2.ClassifyStreamResponse]] = {}
        self._outbox: deque[inference_pb2.ClassifyStreamRequest] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._ended: FlotillaError | None = None
        self._packing = False
        """The router takes packed requests (its initial metadata said so)."""
        self._heard = asyncio.Event()
        """The router's initial metadata has come (or the stream is over): ``_packing`` is known."""
        self._writer = asyncio.create_task(self._write(), name="classify-stream-write")
        self._reader = asyncio.create_task(self._read(), name="classify-stream-read")

    async def __aenter__(self) -> ClassifyStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            await self.close()
        else:
            await self.cancel()

    @property
    def ended(self) -> FlotillaError | None:
        """Why the stream is over (None while it is open): every request waiting then, and every
        later one, failed with this very error."""
        return self._ended

    @property
    def in_flight(self) -> int:
        """Requests sent (or queued to send) and not yet answered."""
        return len(self._waiting)

    async def classify(
        self,
        image_uuid: str,
        *,
        top_k: int = 5,
        timeout_s: float | None = None,
        model: str = "",
        request_id: str = "",
    ) -> Classification:
        """Classify an uploaded image on this stream; raises its ``FlotillaError``.

        ``timeout_s`` (default: the client's ``default_timeout_s``) is this
        request's deadline from when the router reads it; ``model`` (default:
        the stream's) may differ per request.
        """
        if self._ended is not None:
            raise self._ended
        if self._closing:
            raise Unavailable("this stream is closing: open another")
        timeout_s = self.default_timeout_s if timeout_s is None else timeout_s
        stream_id = str(next(self._ids))
        future = asyncio.get_running_loop().create_future()
        self._waiting[stream_id] = future
        self._outbox.append(inference_pb2.ClassifyStreamRequest(
            id=stream_id,
            request=inference_pb2.ClassifyRequest(image_uuid=image_uuid, top_k=top_k, request_id=request_id),
            model_name=model if model != self.model else "",
            timeout_ms=min(max(1, math.ceil(timeout_s * 1000)), MAX_TIMEOUT_MS),
        ))
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s + ANSWER_GRACE_S):
                answer = await future
        except TimeoutError:
            raise DeadlineExceeded(f"router {self.router} did not answer within {timeout_s:g} s") from None
        finally:
            self._waiting.pop(stream_id, None)
        if answer.HasField("error"):
            error = error_from_code(answer.error.code, answer.error.message, answer.error.origin)
            if answer.error.retry_after_ms and isinstance(error, ResourceExhausted):
                error.retry_after_s = answer.error.retry_after_ms / 1000  # a key over its rate: when to retry
            raise error
        return classification_of(answer.response)

    async def close(self) -> None:
        """Close the sending side and wait until every request sent is answered and the stream has ended."""
        self._closing = True
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._stop_writer()

    async def cancel(self) -> None:
        """End the stream now: requests still waiting fail with CANCELLED."""
        self._call.cancel()
        self._end(error_from_code(Code.CANCELLED, "the stream was cancelled"))
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._stop_writer()

    async def _stop_writer(self) -> None:
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer

    async def _write(self) -> None:
        try:
            while True:
                while self._outbox:
                    if len(self._outbox) > 1 and not self._heard.is_set():
                        await self._heard.wait()  # the router's initial metadata says whether it takes packs
                    if len(self._outbox) == 1 or not self._packing:
                        await self._call.write(self._outbox.popleft())
                    else:
                        pack = [self._outbox.popleft() for _ in range(min(len(self._outbox), MAX_PACK))]
                        await self._call.write(inference_pb2.ClassifyStreamRequest(requests=pack))
                if self._closing:
                    await self._call.done_writing()
                    return
                self._wake.clear()
                await self._wake.wait()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            return  # the stream is over: the reader learns how, and fails what is still waiting

    async def _read(self) -> None:
        error: FlotillaError
        try:
            headers = await self._call.initial_metadata()
            self._packing = any(key == STREAM_PACKING_HEADER for key, _ in headers or ())
            self._heard.set()
            async for message in self._call:
                for answer in message.responses or (message,):  # packed answers, or one
                    future = self._waiting.get(answer.id)
                    if future is not None and not future.done():
                        future.set_result(answer)
            error = Unavailable(f"router {self.router} ended the stream before answering this request")
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc, f"router {self.router}")
        self._end(error)

    def _end(self, error: FlotillaError) -> None:
        """The stream is over: what is still waiting, and any later request, fails with ``error``."""
        if self._ended is None:
            self._ended = error
        self._heard.set()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
        self._wake.set()


class ReopeningStream:
    """Many requests on one ``ClassifyStream`` at a time, opening another when one breaks.

    A request that the ending stream failed (``ClassifyStream.ended``, with a
    status of ``REOPEN_CODES``) goes again on the next stream, after a backoff
    of ``REOPEN_BACKOFF_S`` doubling up to ``REOPEN_MAX_BACKOFF_S``, while its
    own deadline (``timeout_s`` from the first send) leaves time for it; then,
    or with ``reopen`` off, it raises the stream's error. A request's own error (its answer on the stream) and a
    stream ended with any other status (a bad key: UNAUTHENTICATED) are raised
    as they came. ``open_stream(reopened)`` opens a stream (``reopened``: not
    the first, so it may wait for the router to come back).
    """

    def __init__(
        self, open_stream: Callable[[bool], ClassifyStream], *, default_timeout_s: float, reopen: bool = True
    ) -> None:
        self._open_stream = open_stream
        self.default_timeout_s = default_timeout_s
        self.reopen = reopen
        self.opened = 0
        """Streams opened so far (1 + how many times one was reopened)."""
        self._stream: ClassifyStream | None = None
        self._ended: list[ClassifyStream] = []

    def _current(self) -> ClassifyStream:
        stream = self._stream
        if stream is None or stream.ended is not None:
            if stream is not None:
                self._ended.append(stream)  # its tasks are collected at close
            stream = self._stream = self._open_stream(self.opened > 0)
            self.opened += 1
        return stream

    async def classify(self, image_uuid: str, *, top_k: int = 5, timeout_s: float | None = None) -> Classification:
        """Classify an uploaded image on the current stream, again on a new one if that one ends under it."""
        loop = asyncio.get_running_loop()
        timeout_s = self.default_timeout_s if timeout_s is None else timeout_s
        deadline_s = loop.time() + timeout_s
        backoff_s = REOPEN_BACKOFF_S
        while True:
            stream = self._current()
            try:
                return await stream.classify(image_uuid, top_k=top_k, timeout_s=timeout_s)
            except FlotillaError as exc:
                timeout_s = deadline_s - loop.time() - backoff_s
                if not (self.reopen and exc is stream.ended and exc.code in REOPEN_CODES) or timeout_s <= 0:
                    raise
            await asyncio.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, REOPEN_MAX_BACKOFF_S)

    async def close(self) -> None:
        """Close the open stream (every request sent is answered first); collect the ended ones."""
        ended, self._ended = self._ended, []
        for stream in ended:
            await stream.cancel()
        if self._stream is not None:
            stream, self._stream = self._stream, None
            if stream.ended is None:
                await stream.close()
            else:
                await stream.cancel()

    async def cancel(self) -> None:
        """End every stream now: requests still waiting fail with CANCELLED."""
        streams = [*self._ended, *([self._stream] if self._stream is not None else [])]
        self._ended, self._stream = [], None
        for stream in streams:
            await stream.cancel()
