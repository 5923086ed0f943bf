"""Fuzz: what a batcher parses. Classify bodies (however they arrive: a unary call or a relay frame) and
the frames of the router's relay stream, through the real handler, lanes and batch queue over a fake
clock and a fake dispatcher.

A body or frame is answered with a status a caller can act on (INVALID_ARGUMENT, NOT_FOUND,
UNIMPLEMENTED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) or served, never INTERNAL; a relay stream ends
once its caller's side ends and its calls are answered, with no call left running behind it; only
numbers reach the dispatcher as deadlines. A relay stream of any bytes, on a real server, ends OK or,
when a message is not a CallFrames, INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st

from flotilla.api.v1 import inference_pb2, preprocess_pb2, relay_pb2
from flotilla.common.relay import RelayServicer
from flotilla.common.server import ServiceServer
from flotilla.common.wire import CLASSIFY_METHOD, MODEL_HEADER, RELAY_CALLS_METHOD
from flotilla.config import BatchingSettings, ModelSettings
from flotilla.errors import FlotillaError, InvalidArgument
from flotilla.services.batcher.lanes import Lane, Lanes
from flotilla.services.batcher.queue import BatchQueue
from flotilla.services.batcher.requests import ClassifyRequests
from flotilla.services.batcher.server import ClassifierHandler
from tests.fuzz.strategies import UINT64, classify_bodies, header_text
from tests.rawh2 import RawH2, grpc_headers
from tests.unit.fakes import FakeClock

MODEL = "classifier"
DELAY_US = 1000
OUTER_BOUND_S = 30.0
"""A generous bound on one case (the fake clock makes it milliseconds): past it, the stream hangs."""
DOCUMENTED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CODES = {code.value[0]: code for code in grpc.StatusCode}


class Dispatcher:
    """Answers every item at once and keeps the deadlines it was given."""

    def __init__(self) -> None:
        self.deadlines: list[float | None] = []

    async def __call__(
        self, items: list[preprocess_pb2.BatchItem], deadline_s: float | None
    ) -> list[inference_pb2.ClassifyResponse]:
        self.deadlines.append(deadline_s)
        return [inference_pb2.ClassifyResponse(image_uuid=i.image_uuid, model_name=MODEL) for i in items]


class Shard:
    """One batcher's Classify path with its lane for MODEL: handler -> lane -> requests -> queue."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.dispatcher = Dispatcher()
        self.lanes = Lanes(self.make_lane, clock=self.clock, move_grace_s=1.0)
        self.lanes.assign({MODEL: ModelSettings(
            storage_uri="s3://b/m", versions=[1, 2], default_version=1,
            batching=BatchingSettings(max_queue_delay_us=DELAY_US, max_queue_size=64, priority_levels=2),
        )})
        self.handler = ClassifierHandler(self.lanes)
        self.started: list[asyncio.Future[Any]] = []

    def make_lane(self, model: str, spec: ModelSettings) -> Lane:
        queue: BatchQueue[Any, Any] = BatchQueue(model, spec.batching, self.dispatcher, clock=self.clock)
        return Lane(model, spec, queue, ClassifyRequests(model, queue, self.clock, spec.versions), self.dispatcher)

    def start(self, frame: relay_pb2.CallFrame) -> asyncio.Future[inference_pb2.ClassifyResponse]:
        future = self.handler.start(frame)
        self.started.append(future)
        return future

    def deadlines_are_numbers(self) -> bool:
        return all(d is None or math.isfinite(d) for d in self.dispatcher.deadlines)


def status_of(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, FlotillaError), f"not a FlotillaError: {exc!r}"
    return CODES[exc.code.value]


@given(classify_bodies([MODEL]), st.sampled_from([None, MODEL, "other", ""]), st.sampled_from([None, 0.5, 1e-9]))
@example(b"\x0a\x03abc", None, None)
@example(b"\xff", MODEL, None)
async def test_a_classify_body_is_queued_or_refused_with_a_status(
    body: bytes, header_model: str | None, timeout_s: float | None
) -> None:
    shard = Shard()
    headers = [] if header_model is None else [relay_pb2.Header(key=MODEL_HEADER, value=header_model)]
    frame = relay_pb2.CallFrame(id=1, method=CLASSIFY_METHOD, request=body, headers=headers, timeout_s=timeout_s or 0)
    try:
        future = shard.start(frame)
    except Exception as exc:  # noqa: BLE001 (what is raised is the property)
        assert status_of(exc) in DOCUMENTED - {grpc.StatusCode.OK}
        return
    finally:
        await shard.clock.advance(1.0)
    try:
        await asyncio.wait_for(future, OUTER_BOUND_S)
    except Exception as exc:  # noqa: BLE001
        assert status_of(exc) in DOCUMENTED - {grpc.StatusCode.OK}
    finally:
        await shard.lanes.close()


timeouts = st.sampled_from([0.0, 0.5, -1.0, math.nan, math.inf, -math.inf, 1e308]) | st.floats()


@st.composite
def frames(draw: st.DrawFn) -> relay_pb2.CallFrame:
    """A frame with any fields: ids that repeat, methods that are not Classify, any timeout, cancels."""
    headers = draw(st.lists(st.tuples(st.sampled_from([MODEL_HEADER, "x-other", ""]) | header_text,
                                      st.sampled_from([MODEL, "other", ""]) | header_text), max_size=3))
    return relay_pb2.CallFrame(
        id=draw(st.integers(0, 4) | UINT64),
        method=draw(st.sampled_from([CLASSIFY_METHOD, CLASSIFY_METHOD, "/x/Y", ""])),
        request=draw(classify_bodies([MODEL])),
        timeout_s=draw(timeouts),
        headers=[relay_pb2.Header(key=k, value=v) for k, v in headers],
        cancel=draw(st.booleans()) and draw(st.booleans()),
    )


def valid_frame(call_id: int, **fields: Any) -> relay_pb2.CallFrame:
    body = inference_pb2.ClassifyRequest(image_uuid="123e4567-e89b-12d3-a456-426614174000", model_name=MODEL)
    return relay_pb2.CallFrame(id=call_id, method=CLASSIFY_METHOD, request=body.SerializeToString(), **fields)


@given(st.lists(st.lists(frames(), max_size=5).map(lambda f: relay_pb2.CallFrames(calls=f)), max_size=4))
@example([relay_pb2.CallFrames(calls=[valid_frame(1, timeout_s=math.nan)])])  # found: the queue re-armed its timer forever
@example([relay_pb2.CallFrames(calls=[valid_frame(1, timeout_s=math.inf)])])
@example([relay_pb2.CallFrames(calls=[valid_frame(1, timeout_s=-1.0)])])
@example([relay_pb2.CallFrames(calls=[valid_frame(7, timeout_s=1.0)]), relay_pb2.CallFrames(calls=[valid_frame(7)])])
async def test_relay_frames_are_each_answered_with_a_status_and_the_stream_ends(
    messages: list[relay_pb2.CallFrames],
) -> None:
    shard = Shard()
    servicer = RelayServicer(shard.start, tier="batcher")
    sent = {frame.id for message in messages for frame in message.calls}
    ended = asyncio.Event()

    async def requests() -> AsyncIterator[relay_pb2.CallFrames]:
        for message in messages:
            yield relay_pb2.CallFrames.FromString(message.SerializeToString())  # as the server hands it over
        ended.set()

    async def answers() -> list[relay_pb2.AnswerFrame]:
        got = []
        async for message in servicer.calls(requests(), None):  # type: ignore[arg-type]  # the context is unused
            got.extend(message.answers)
        return got

    reading = asyncio.ensure_future(answers())
    try:
        await ended.wait()
        for _ in range(20):  # batches form, deadlines pass: the clock runs until every call is answered
            if reading.done():
                break
            await shard.clock.advance(1.0)
        got = await asyncio.wait_for(reading, OUTER_BOUND_S)
        assert all(f.done() for f in shard.started), "a call outlived its stream"
        assert shard.deadlines_are_numbers(), shard.dispatcher.deadlines
        for answer in got:
            assert answer.id in sent
            assert CODES[answer.code] in DOCUMENTED, (CODES[answer.code], answer.message)
    finally:
        reading.cancel()
        await shard.lanes.close()


# -- the relay's messages as they come off the network ---------------------------------------------


@pytest.fixture
async def relay_port() -> AsyncIterator[int]:
    """A server with a RelayServicer whose calls are refused (INVALID_ARGUMENT) as they come."""

    def start(frame: relay_pb2.CallFrame) -> asyncio.Future[inference_pb2.ClassifyResponse]:
        raise InvalidArgument(f"call {frame.id} refused")

    server = ServiceServer("relay fuzz", [], grace_s=0, tier="batcher")
    server.server.add_generic_rpc_handlers([RelayServicer(start, tier="batcher").generic_handler()])
    yield await server.start("127.0.0.1", 0)
    await server.stop()


@given(st.lists(st.binary(max_size=40) | frames().map(lambda f: relay_pb2.CallFrames(calls=[f]).SerializeToString()),
                min_size=1, max_size=3))
@example([b"\xff\xff\xff"])  # found: the reader task died of the DecodeError unobserved; the stream ended OK
async def test_a_relay_stream_of_any_bytes_ends_ok_or_invalid_argument(relay_port: int, messages: list[bytes]) -> None:
    # A raw HTTP/2 client: a gRPC client's own failed write (the server ended the stream first) would
    # replace the server's status with its own INTERNAL.
    async with RawH2("127.0.0.1", relay_port) as connection:
        stream = connection.open_stream(grpc_headers(RELAY_CALLS_METHOD))
        connection.send_messages(stream, messages)
        await connection.flush()
        await connection.read_until(lambda: bool(connection.statuses), OUTER_BOUND_S)
        statuses = dict(connection.statuses)
    parses = True
    for message in messages:
        try:
            relay_pb2.CallFrames.FromString(message)
        except DecodeError:
            parses = False
    expected = grpc.StatusCode.OK if parses else grpc.StatusCode.INVALID_ARGUMENT
    assert statuses == {str(expected.value[0]): 1}, statuses
