"""Many unary calls on one long-lived stream between two tiers (``relay.proto``).

A unary gRPC call costs each side an HTTP/2 stream, headers, a handler
task and a round of event-loop work; carried as frames on one stream,
``RelayClient`` and ``RelayServicer`` pay that once per event-loop turn for
every call ready in it. The semantics stay those of a unary call: each call
has its own deadline, status and message; a caller that goes away cancels
its call downstream; a stream that breaks fails every call still on it with
UNAVAILABLE (the pools retry those on another replica, as for a unary call).

The servicer side is generic: a ``start`` callable turns a frame into a
future (a call in progress; cancelling the future withdraws it), the
servicer turns futures into answers. Each call takes the same path as a
unary call through the interceptor (``interceptors.CallObserver``):
admission, its span, its status (``status_of``, ``origin_of``) and the
request metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from flotilla.api.v1 import relay_pb2
from flotilla.common import tracing
from flotilla.common.clock import MeanGap
from flotilla.common.interceptors import AdmissionLimit, CallObserver, ModelLabel, ObservedCall, origin_of, status_of
from flotilla.common.wire import MODEL_HEADER, RELAY_CALLS_METHOD, RELAY_SERVICE, method_name
from flotilla.errors import DeadlineExceeded, FlotillaError, MalformedRequest, Unavailable, error_from_code

log = logging.getLogger(__name__)

OK = grpc.StatusCode.OK.value[0]
# Write coalescing on a busy stream: with at least COALESCE_OPEN_CALLS calls open on
# it and fewer than COALESCE_MAX_FRAMES queued, a write waits so that the calls that
# follow share its message: COALESCE_SHARE of the stream's mean call round trip, at
# most COALESCE_MAX_S. The wait adds at most that share to what a caller sees; a
# fixed 0.5 ms put 1.1 calls in each message in front of a saturated model (~400 ms
# round trips) and kept the batcher waking once per request. A share of 1% still put
# 1.2 calls in a message at the router's own ceiling (`flotilla bench --only
# ceiling`: 10-50 ms round trips, ~3 000 calls/s, so a 0.1-0.5 ms wait rarely saw a
# second call), where each relay message costs the router a gRPC write, a read and
# their completions; 10% put 3.5-9 calls in each and took the router's CPU per unary
# call from 320-380 to 240-250 us (2026-12-06, 2 cores): at that load the wait
# shortens what callers see, as the router's own queue shrinks.
COALESCE_OPEN_CALLS = 16
COALESCE_SHARE = 0.1
COALESCE_MAX_S = 0.005
COALESCE_MAX_FRAMES = 64
# Pacing, whatever the round trip (``RelayClient(pacing_s=)``; the router's
# ``router.pacing_ms``, 2 by default): a stream whose calls come at least
# PACED_CALLS an interval sends at most one message per pacing_s; a write
# within that of the last one waits for the rest of it, and the calls of that
# time share its message. Calls further apart go at once. A
# wait shorter than TIMER_RESOLUTION_S is none: the event loop's timers
# (uvloop's, and epoll's timeouts) have millisecond resolution, so such a wait
# is a bare loop turn, and that measured worse than no wait at all (1.0-1.1
# calls a message, 20-30% more router CPU a call). At the router's own ceiling
# (an instant batcher: 1-3 ms round trips, so 10% of one is under a
# millisecond) unpaced messages carried 1.4-2.6 calls; paced at 2 ms, 5.8-6.2,
# and the router's CPU a unary call went from 1.71x an empty grpc.aio server's
# to 1.28x, 3 ms 1.19x (4 paired rounds, 2026-12-07, 2 shared cores).
TIMER_RESOLUTION_S = 0.001
PACED_CALLS = 3.0
"""Pacing holds a stream only while its calls have been coming at least this many an interval on
average (a moving mean of the gaps between them): below, calls seldom share a paced message and a
wait would be mostly latency. Open loop through the router alone (an instant batcher, 2026-12-07):
ungated 2 ms pacing added 0.4 ms to the p50 at 200 calls/s and 1.3 ms at 1 000; gated at 2 calls
an interval, nothing at 200 and 0.85 ms at 1 000 (3, this, leaves 1 000 calls/s unpaced); at
3 000 calls/s (the router's own limit on this machine) paced calls took 4.5 ms at the p50 against
108 unpaced, the router out of CPU."""
CALL_GAP_WEIGHT = 1 / 16
"""Weight of each new call's gap since the one before in the stream's moving mean gap."""
ROUND_TRIP_WEIGHT = 0.05
"""Weight of each answered call in the stream's moving mean round trip."""
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
DEADLINE_SWEEP_S = 0.1
DEADLINE_GRACE_S = 0.1
"""The peer ends each call at its deadline (``timeout_s`` travels in its frame). A peer that never answers
(hung, or its side of the connection gone silent) is the client's to catch: every DEADLINE_SWEEP_S a
stream fails the calls still open DEADLINE_GRACE_S past their deadline with DEADLINE_EXCEEDED and withdraws
them. One sweep a stream, not a timer a call: a front that holds no gRPC deadline of its own for a call
(a request on a stream) relies on it."""
MESSAGE_BYTES = 1024 * 1024
"""A relay message carries the frames ready in one turn up to about this size; the rest go in the
next. A peer takes 4 MiB per message (gRPC's default): one turn of many answers with every class's
score (KServe answers, ~4 KB each for 1 000 classes) could pass that and break the whole stream,
failing every call on it."""

class Sized(Protocol):
    def ByteSize(self) -> int: ...  # noqa: N802 (protobuf's name)


F = TypeVar("F", bound=Sized)  # a frame, or any message packed with others into one


def one_message(frames: list[F]) -> tuple[list[F], list[F]]:
    """The first frames of ``frames`` that fit in one message of ``MESSAGE_BYTES`` (at least one), and the rest."""
    size, cut = 0, 0
    for frame in frames:
        size += frame.ByteSize()
        if cut and size > MESSAGE_BYTES:
            break
        cut += 1
    return (frames, []) if cut == len(frames) else (frames[:cut], frames[cut:])


# -- client ----------------------------------------------------------------------


class RelayClient:
    """Sends unary calls to one peer as frames on one ``Relay.Calls`` stream.

    The stream opens on the first call and again on the first call after it
    ended; frames queued in the same event-loop turn go out as one message, and
    with ``pacing_s`` those of that long after a message go out in the next
    (``coalesce_wait_s``).
    """

    def __init__(self, channel: grpc.aio.Channel, peer: str, *, pacing_s: float = 0.0) -> None:
        self.peer = peer
        self.pacing_s = pacing_s
        self._open_stream: grpc.aio.StreamStreamMultiCallable[relay_pb2.CallFrames, relay_pb2.AnswerFrames]
        self._open_stream = channel.stream_stream(
            RELAY_CALLS_METHOD,
            request_serializer=relay_pb2.CallFrames.SerializeToString,
            response_deserializer=relay_pb2.AnswerFrames.FromString,
        )
        self._stream: _ClientStream | None = None
        self._answered = False
        """Whether a stream before the current one had an answer."""

    async def call(
        self, method: str, request: bytes, headers: Sequence[tuple[str, str]], timeout_s: float | None
    ) -> bytes:
        """The peer's answer to ``method`` with ``request``; raises its status as a FlotillaError.

        ``timeout_s`` travels to the peer, which ends the call at that deadline
        (DEADLINE_EXCEEDED); cancelling this call withdraws it from the peer.
        """
        stream = self._stream
        if stream is None or stream.closed:
            self._answered = self.answered
            stream = self._stream = _ClientStream(self._open_stream(), self.peer, self.pacing_s)
        answer = await stream.call(method, request, headers, timeout_s)
        if answer.code == OK:
            return answer.response
        raise error_from_code(answer.code, answer.message, answer.origin)

    @property
    def open_calls(self) -> int:
        return 0 if self._stream is None else len(self._stream.pending)

    @property
    def answered(self) -> bool:
        """Whether the peer has answered a frame on any of this client's streams: it serves the relay.

        A stream that breaks before its first answer may also be a peer without a relay: a write that
        races the peer's UNIMPLEMENTED gets grpc.aio's INTERNAL "Internal error from Core" in place
        of that status (``BROKEN_STREAM_CODES``)."""
        return self._answered or (self._stream is not None and self._stream.answered)

    @property
    def stream_open(self) -> bool:
        """Whether a stream to the peer is open now (for observing state: it ends on drain or failure)."""
        return self._stream is not None and not self._stream.closed

    @property
    def round_trip_s(self) -> float:
        """The latest stream's moving mean round trip, 0 before one is answered (for observing state)."""
        return 0.0 if self._stream is None else self._stream.round_trip_s

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close(Unavailable(f"relay to {self.peer} closed"))


def coalesce_wait_s(
    open_calls: int, queued_frames: int, round_trip_s: float, since_write_s: float = math.inf, pacing_s: float = 0.0,
    call_gap_s: float = 0.0,
) -> float:
    """How long a write waits for more frames to share its message (0: send now).

    Never once a message is full. A busy stream (calls keep arriving while
    others are open) waits COALESCE_SHARE of a call's round trip, at most
    COALESCE_MAX_S; a stream whose last message went less than ``pacing_s``
    ago (``since_write_s``) waits for the rest of that, while its calls have
    been coming at least PACED_CALLS an interval (``call_gap_s``, their mean
    gap: a stream with fewer would wait for no company). A wait under the
    loop's timer resolution is none: a quiet stream sends at once.
    """
    if queued_frames >= COALESCE_MAX_FRAMES:
        return 0.0
    wait_s = min(COALESCE_SHARE * round_trip_s, COALESCE_MAX_S) if open_calls >= COALESCE_OPEN_CALLS else 0.0
    if since_write_s < pacing_s and call_gap_s * PACED_CALLS <= pacing_s:  # the rest, a timer's resolution at least
        wait_s = max(wait_s, pacing_s - since_write_s, TIMER_RESOLUTION_S)
    return wait_s if wait_s >= TIMER_RESOLUTION_S else 0.0


BROKEN_STREAM_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
})
"""How a relay stream ends when its transport broke under it, not by the peer's choice: each call on
it fails UNAVAILABLE (never answered: the pools send it to another replica). INTERNAL is among them:
a write that races the connection's end (a peer killed) gets grpc.aio's INTERNAL "Internal error
from Core", which failed every call on the stream INTERNAL, past the pools' retries (seen killing a
batching shard under load, 16 calls of 260)."""


def stream_failure(exc: BaseException | None, peer: str) -> FlotillaError:
    """What each call still on a relay stream to ``peer`` fails with once the stream ended with ``exc``
    (None: the peer ended it OK): the peer's own status when it refused the stream (an
    UNAUTHENTICATED certificate, an INVALID_ARGUMENT message), else UNAVAILABLE."""
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in BROKEN_STREAM_CODES:
        return error_from_code(exc.code().value[0], exc.details() or exc.code().name)
    if isinstance(exc, grpc.aio.AioRpcError):
        return Unavailable(f"{peer} is unavailable: {exc.details() or exc.code().name}")
    if exc is not None:
        return Unavailable(f"relay stream to {peer} failed: {exc!r}")
    return Unavailable(f"{peer} closed the relay stream (shutting down?)")


class _ClientStream:
    def __init__(
        self, call: grpc.aio.StreamStreamCall[relay_pb2.CallFrames, relay_pb2.AnswerFrames], peer: str,
        pacing_s: float = 0.0,
    ) -> None:
        self.rpc = call
        self.peer = peer
        self.pacing_s = pacing_s
        self.closed = False
        self.answered = False
        """Whether an answer frame has come on this stream."""
        self.round_trip_s = 0.0
        """Moving mean of the answered calls' round trips (0 until one is answered)."""
        self.call_gaps = MeanGap(CALL_GAP_WEIGHT)
        """Moving mean of the gaps between calls (infinite until a second call)."""
        self.pending: dict[int, asyncio.Future[relay_pb2.AnswerFrame]] = {}
        self._deadlines: dict[int, float] = {}
        """Open calls with a deadline -> it (the loop's clock), for ``_sweep``."""
        self._sweeper: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._outbox: list[relay_pb2.CallFrame] = []
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._write(), name=f"relay-write:{peer}")
        self._reader = asyncio.create_task(self._read(), name=f"relay-read:{peer}")

    async def call(
        self, method: str, request: bytes, headers: Sequence[tuple[str, str]], timeout_s: float | None
    ) -> relay_pb2.AnswerFrame:
        call_id = next(self._ids)
        loop = asyncio.get_running_loop()
        sent_s = loop.time()
        self.call_gaps.note(sent_s)
        future: asyncio.Future[relay_pb2.AnswerFrame] = loop.create_future()
        self.pending[call_id] = future
        self._send(relay_pb2.CallFrame(
            id=call_id, method=method, request=request, timeout_s=timeout_s or 0.0,
            headers=[relay_pb2.Header(key=k, value=v) for k, v in headers],
        ))
        # No timer here: the peer ends the call at its deadline, a caller that goes away cancels this
        # wait (gRPC cancels a server handler at its deadline), which withdraws the call downstream, and
        # a peer that never answers is caught by the stream's sweep.
        if timeout_s:
            self._deadlines[call_id] = sent_s + timeout_s
            if self._sweeper is None:
                self._sweeper = asyncio.create_task(self._sweep(), name=f"relay-deadlines:{self.peer}")
        try:
            answer = await future
        except asyncio.CancelledError:
            if self.pending.pop(call_id, None) is not None and not self.closed:
                self._send(relay_pb2.CallFrame(id=call_id, cancel=True))  # the caller went away
            raise
        finally:
            if timeout_s:
                self._deadlines.pop(call_id, None)
        round_trip_s = loop.time() - sent_s
        self.round_trip_s += (ROUND_TRIP_WEIGHT if self.round_trip_s else 1.0) * (round_trip_s - self.round_trip_s)
        return answer

    async def _sweep(self) -> None:
        """Fail the calls their peer left unanswered ``DEADLINE_GRACE_S`` past their deadline, while any
        call with a deadline is open (the next one starts it again)."""
        loop = asyncio.get_running_loop()
        while self._deadlines:
            await asyncio.sleep(DEADLINE_SWEEP_S)
            cutoff_s = loop.time() - DEADLINE_GRACE_S
            for call_id in [i for i, deadline_s in self._deadlines.items() if deadline_s <= cutoff_s]:
                del self._deadlines[call_id]
                future = self.pending.pop(call_id, None)
                if future is not None and not future.done():
                    future.set_exception(DeadlineExceeded(f"{self.peer} did not answer by the call's deadline"))
                    if not self.closed:
                        self._send(relay_pb2.CallFrame(id=call_id, cancel=True))
        self._sweeper = None

    def _send(self, frame: relay_pb2.CallFrame) -> None:
        self._outbox.append(frame)
        self._wake.set()

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        written_s = -math.inf  # when the latest message was handed to gRPC
        try:
            while True:
                await self._wake.wait()
                wait_s = coalesce_wait_s(
                    len(self.pending), len(self._outbox), self.round_trip_s, loop.time() - written_s, self.pacing_s,
                    self.call_gaps.mean_s,
                )
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                self._wake.clear()
                while self._outbox:
                    frames, self._outbox = one_message(self._outbox)
                    written_s = loop.time()
                    await self.rpc.write(relay_pb2.CallFrames(calls=frames))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._end(exc)

    async def _read(self) -> None:
        try:
            async for message in self.rpc:
                self.answered = True
                for answer in message.answers:
                    future = self.pending.pop(answer.id, None)
                    if future is not None and not future.done():
                        future.set_result(answer)
            self._end(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._end(exc)

    def _end(self, exc: BaseException | None) -> None:
        """The stream is over: every call still on it fails (UNAVAILABLE unless the peer said otherwise)."""
        if self.closed:
            return
        self.closed = True
        self._fail_all(stream_failure(exc, self.peer))
        self._writer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.rpc.cancel()

    def _fail_all(self, error: FlotillaError) -> None:
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    async def close(self, error: FlotillaError) -> None:
        self.closed = True
        self._fail_all(error)
        tasks = [t for t in (self._writer, self._reader, self._sweeper) if t is not None]
        for task in tasks:
            task.cancel()
        self.rpc.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# -- server ----------------------------------------------------------------------


class Answerable(Protocol):
    def SerializeToString(self) -> bytes: ...  # noqa: N802 (protobuf's name)


A = TypeVar("A", bound=Answerable)  # the answer a servicer's calls end with (a protobuf message)

# frame -> the call in progress (its deadline: frame.timeout_s from now, 0 for none); raises to refuse it
Start = Callable[[relay_pb2.CallFrame], asyncio.Future[A]]


class RelayServicer(Generic[A]):
    """Answers the frames of every ``Relay.Calls`` stream through ``start``."""

    def __init__(
        self,
        start: Start[A],
        *,
        tier: str,
        admission: AdmissionLimit | None = None,
        model_label: ModelLabel | None = None,
    ) -> None:
        self.start = start
        self.tier = tier
        self.observer = CallObserver(tier, admission, model_label)
        self.draining = False
        self.messages = 0
        """CallFrames messages received (calls / messages = how many calls shared one)."""
        self.calls_received = 0
        self._streams: set[_ServerStream[A]] = set()

    def drain(self) -> None:
        """Shutting down: new calls get UNAVAILABLE (callers retry elsewhere); open ones finish, then streams end."""
        self.draining = True
        for stream in self._streams:
            stream.wake.set()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            RELAY_SERVICE,
            {
                "Calls": grpc.stream_stream_rpc_method_handler(
                    self.calls,
                    request_deserializer=relay_pb2.CallFrames.FromString,
                    response_serializer=relay_pb2.AnswerFrames.SerializeToString,
                )
            },
        )

    async def calls(
        self,
        requests: AsyncIterator[relay_pb2.CallFrames],
        context: grpc.aio.ServicerContext[relay_pb2.CallFrames, relay_pb2.AnswerFrames],
    ) -> AsyncIterator[relay_pb2.AnswerFrames]:
        stream = _ServerStream(self)
        self._streams.add(stream)
        reader = asyncio.create_task(stream.read(requests))
        try:
            while True:
                answers = await stream.next_answers()
                if answers is None:
                    if stream.malformed:  # its open calls are withdrawn (finally)
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, stream.malformed)
                    return
                yield relay_pb2.AnswerFrames(answers=answers)
        finally:
            self._streams.discard(stream)
            reader.cancel()
            stream.withdraw_all()


class _ServerStream(Generic[A]):
    def __init__(self, servicer: RelayServicer[A]) -> None:
        self.servicer = servicer
        self.open: dict[int, asyncio.Future[A]] = {}
        self.outbox: list[relay_pb2.AnswerFrame] = []
        self.wake = asyncio.Event()
        self.read_done = False
        self.malformed = ""
        """Why the stream ends INVALID_ARGUMENT: a message that is not a CallFrames (found by fuzzing: the
        reader task died of the DecodeError unobserved, and the stream ended OK)."""

    async def read(self, requests: AsyncIterator[relay_pb2.CallFrames]) -> None:
        try:
            async for message in requests:
                self.servicer.messages += 1
                self.servicer.calls_received += len(message.calls)
                for frame in message.calls:
                    if frame.cancel:
                        future = self.open.pop(frame.id, None)
                        if future is not None:
                            future.cancel()
                    else:
                        self._begin(frame)
        except DecodeError as exc:
            self.malformed = f"relay message is not a {relay_pb2.CallFrames.DESCRIPTOR.full_name}: {exc}"
        finally:
            self.read_done = True
            self.wake.set()

    async def next_answers(self) -> list[relay_pb2.AnswerFrame] | None:
        """The answers ready now (waiting for some); None once the stream is over."""
        while not self.outbox:
            if self.malformed or (not self.open and (self.read_done or self.servicer.draining)):
                return None
            self.wake.clear()
            await self.wake.wait()
        answers, self.outbox = one_message(self.outbox)
        if self.outbox:
            self.wake.set()  # the rest go in the next message
        return answers

    def _begin(self, frame: relay_pb2.CallFrame) -> None:
        servicer = self.servicer
        observer = servicer.observer
        headers = [(h.key, h.value) for h in frame.headers]
        named = next((value for key, value in reversed(headers) if key == MODEL_HEADER), "")
        call = observer.begin(method_name(frame.method), named, headers)
        try:
            if servicer.draining:
                raise Unavailable(f"the {servicer.tier} is shutting down; retry on another replica")
            if call.refusal is not None:
                raise call.refusal
            _check_frame(frame, self.open)
            if call.span is None:
                future = servicer.start(frame)
            else:
                with tracing.use_span(call.span, end_on_exit=False):
                    future = servicer.start(frame)
        except Exception as exc:
            self._answer_error(frame.id, call, exc)
            return
        self.open[frame.id] = future
        future.add_done_callback(lambda f: self._finish(frame.id, f, call))

    def _finish(self, call_id: int, future: asyncio.Future[A], call: ObservedCall) -> None:
        observer = self.servicer.observer
        self.open.pop(call_id, None)
        if future.cancelled():  # the caller went away: nobody to answer
            observer.end(call, grpc.StatusCode.CANCELLED)
            self.wake.set()
            return
        exc = future.exception()
        if exc is not None:
            self._answer_error(call_id, call, exc)
            return
        self.outbox.append(relay_pb2.AnswerFrame(id=call_id, response=future.result().SerializeToString()))
        observer.end(call, grpc.StatusCode.OK)
        self.wake.set()

    def _answer_error(self, call_id: int, call: ObservedCall, exc: BaseException) -> None:
        code, message = status_of(exc, self.servicer.tier)
        self.outbox.append(
            relay_pb2.AnswerFrame(id=call_id, code=code.value[0], message=message, origin=origin_of(exc))
        )
        self.servicer.observer.end(call, code)
        self.wake.set()

    def withdraw_all(self) -> None:
        """The stream is gone (the caller's side closed or broke): withdraw every call still open."""
        open_calls, self.open = self.open, {}
        for future in open_calls.values():
            future.cancel()


def _check_frame(frame: relay_pb2.CallFrame, open_calls: Mapping[int, object]) -> None:
    """Refuse a frame no ``RelayClient`` sends (INVALID_ARGUMENT): a timeout that is not a number of
    seconds from now (NaN, infinite or negative: found by fuzzing, a NaN deadline re-armed the batch
    queue's timer at once, forever), or the id of a call still open on the stream (it took the open
    call's place, which then outlived the stream)."""
    if not (math.isfinite(frame.timeout_s) and frame.timeout_s >= 0):
        raise MalformedRequest(f"relay frame {frame.id}: timeout_s {frame.timeout_s} is not a number of seconds >= 0")
    if frame.id in open_calls:
        raise MalformedRequest(f"relay frame {frame.id}: a call with this id is still open on the stream")
