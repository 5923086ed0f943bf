"""Unary calls as frames on one stream (flotilla.common.relay), over real gRPC on
loopback, against a ``start`` function standing in for a tier's core."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import grpc
import pytest

from flotilla.api.v1 import relay_pb2
from flotilla.common.interceptors import AdmissionLimit
from flotilla.common.relay import (
    COALESCE_MAX_FRAMES,
    COALESCE_MAX_S,
    COALESCE_OPEN_CALLS,
    COALESCE_SHARE,
    PACED_CALLS,
    TIMER_RESOLUTION_S,
    RelayClient,
    RelayServicer,
    coalesce_wait_s,
    stream_failure,
)
from flotilla.common.wire import RELAY_SERVICE
from flotilla.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable
from tests.waiting import until

METHOD = "/flotilla.api.v1.ImageClassifier/Classify"


class Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802
        return self.data


class Core:
    """Echoes each request reversed; b"bad" is refused, b"fail" fails later, b"hold" waits for release."""

    def __init__(self) -> None:
        self.held: list[asyncio.Future[Raw]] = []
        self.headers: list[dict[str, str]] = []
        self.timeouts: list[float] = []

    def start(self, frame: relay_pb2.CallFrame) -> asyncio.Future[Raw]:
        self.headers.append({h.key: h.value for h in frame.headers})
        self.timeouts.append(frame.timeout_s)
        if frame.request == b"bad":
            raise InvalidArgument("bad request: say something else")
        future: asyncio.Future[Raw] = asyncio.get_running_loop().create_future()
        if frame.request == b"fail":
            asyncio.get_running_loop().call_soon(future.set_exception, Unavailable("no worker"))
        elif frame.request == b"fail below":
            error = Unavailable("object store at s3:1 is unreachable", origin="object store s3:1")
            asyncio.get_running_loop().call_soon(future.set_exception, error)
        elif frame.request == b"hold":
            self.held.append(future)
        else:
            future.set_result(Raw(frame.request[::-1]))
        return future


class Relay:
    def __init__(self, core: Core, admission: AdmissionLimit | None = None) -> None:
        self.core = core
        self.servicer = RelayServicer(core.start, tier="batcher", admission=admission)
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers([self.servicer.generic_handler()])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.client = RelayClient(self.channel, f"batcher at 127.0.0.1:{self.port}")

    async def call(self, body: bytes, timeout_s: float | None = 5.0) -> bytes:
        return await self.client.call(METHOD, body, [("x-model-name", "m")], timeout_s)


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    r = Relay(Core())
    await r.server.start()
    yield r
    await r.client.close()
    await r.channel.close()
    await r.server.stop(None)


async def test_concurrent_calls_share_messages_and_each_gets_its_own_answer(relay: Relay) -> None:
    bodies = [f"request {i}".encode() for i in range(200)]
    answers = await asyncio.gather(*(relay.call(b) for b in bodies))
    assert answers == [b[::-1] for b in bodies]
    assert relay.servicer.calls_received == 200
    assert relay.servicer.messages < 20, f"{relay.servicer.messages} messages for 200 calls issued in one turn"
    assert relay.core.headers[0] == {"x-model-name": "m"}
    assert 4.0 < relay.core.timeouts[0] <= 5.0, "the caller's remaining deadline travels with the frame"


async def test_frames_of_one_turn_past_a_message_size_go_in_several_messages(relay: Relay) -> None:
    """12 MiB of calls and 12 MiB of answers ready in one turn: past gRPC's 4 MiB per message as one,
    which broke the stream (the answers of KServe requests carry every class's score)."""
    bodies = [bytes([i]) * (256 * 1024) for i in range(48)]
    answers = await asyncio.gather(*(relay.call(b) for b in bodies))
    assert answers == [b[::-1] for b in bodies]
    assert relay.servicer.calls_received == 48
    assert relay.servicer.messages >= 12, "each message at most about MESSAGE_BYTES"


def test_only_a_busy_stream_waits_to_share_a_message_and_never_long_against_its_round_trip() -> None:
    busy = COALESCE_OPEN_CALLS
    assert coalesce_wait_s(busy - 1, 1, 0.4) == 0.0, "a quiet stream sends at once"
    assert coalesce_wait_s(busy, 1, 0.0) == 0.0, "no round trip measured yet: send at once"
    assert coalesce_wait_s(busy, COALESCE_MAX_FRAMES, 0.4) == 0.0, "a full message goes at once"
    assert coalesce_wait_s(busy, 1, 0.02) == pytest.approx(COALESCE_SHARE * 0.02)
    assert coalesce_wait_s(busy, 1, 10.0) == COALESCE_MAX_S
    assert coalesce_wait_s(busy, 1, 0.005) == 0.0, "under the loop's timer resolution: a bare turn, no wait"


def test_a_paced_stream_sends_at_most_one_message_an_interval() -> None:
    pacing = 0.004
    assert coalesce_wait_s(1, 1, 0.0, since_write_s=0.001, pacing_s=pacing) == pytest.approx(0.003), "the rest of it"
    assert coalesce_wait_s(1, 1, 0.0, since_write_s=0.0035, pacing_s=pacing) == TIMER_RESOLUTION_S, "a timer at least"
    assert coalesce_wait_s(1, 1, 0.0, since_write_s=0.005, pacing_s=pacing) == 0.0, "calls further apart go at once"
    assert coalesce_wait_s(1, 1, 0.0, pacing_s=pacing) == 0.0, "the first message goes at once"
    assert coalesce_wait_s(1, 1, 0.0, since_write_s=0.001) == 0.0, "unpaced"
    assert coalesce_wait_s(1, COALESCE_MAX_FRAMES, 0.0, since_write_s=0.001, pacing_s=pacing) == 0.0, "a full message"
    busy = COALESCE_OPEN_CALLS  # the longer of the two waits
    assert coalesce_wait_s(busy, 1, 1.0, since_write_s=0.001, pacing_s=pacing) == COALESCE_MAX_S


def test_pacing_holds_only_a_stream_whose_calls_come_several_an_interval() -> None:
    pacing = 0.002
    busy_gap = pacing / PACED_CALLS  # PACED_CALLS an interval: paced
    assert coalesce_wait_s(1, 1, 0.0, since_write_s=0.001, pacing_s=pacing, call_gap_s=busy_gap) == pytest.approx(0.001)
    quiet_gap = 1.01 * busy_gap  # a little fewer: the call goes at once
    assert coalesce_wait_s(1, 1, 0.0, since_write_s=0.001, pacing_s=pacing, call_gap_s=quiet_gap) == 0.0
    assert coalesce_wait_s(1, 1, 0.0, since_write_s=0.001, pacing_s=pacing, call_gap_s=math.inf) == 0.0, "one call yet"
    # The round-trip wait of a stream with many calls open is not pacing's: it holds whatever the gap.
    assert coalesce_wait_s(COALESCE_OPEN_CALLS, 1, 1.0, pacing_s=pacing, call_gap_s=math.inf) == COALESCE_MAX_S


async def test_calls_coming_faster_than_the_pacing_share_its_messages() -> None:
    """Few calls open (no round-trip wait), each sent a loop turn after the last: paced, they share."""
    relay = Relay(Core())
    relay.client = RelayClient(relay.channel, "paced batcher", pacing_s=0.05)
    await relay.server.start()
    try:
        assert await relay.call(b"first") == b"tsrif"
        before = relay.servicer.messages
        trickle = []
        for i in range(20):  # one call per event-loop turn, well within the 50 ms
            trickle.append(asyncio.ensure_future(relay.call(f"call {i}".encode())))
            await asyncio.sleep(0)
        assert await asyncio.gather(*trickle) == [f"call {i}".encode()[::-1] for i in range(20)]
        assert relay.servicer.messages - before <= 2, "paced: the calls of an interval share one message"
    finally:
        await relay.client.close()
        await relay.channel.close()
        await relay.server.stop(None)


async def test_calls_trickling_onto_a_busy_stream_share_messages(relay: Relay) -> None:
    """As in front of a saturated model: many calls open, new ones arriving one by one."""
    held = [asyncio.ensure_future(relay.call(b"hold")) for _ in range(COALESCE_OPEN_CALLS)]
    await until(lambda: len(relay.core.held) == COALESCE_OPEN_CALLS, 5, "every call held")
    await asyncio.sleep(0.2)  # duration: the calls stay open 0.2 s, the round trip to be measured
    for future in relay.core.held:
        future.set_result(Raw(b"done"))
    await asyncio.gather(*held)
    assert relay.client.round_trip_s >= 0.2, "the round trip of the answered calls is measured"

    held = [asyncio.ensure_future(relay.call(b"hold")) for _ in range(COALESCE_OPEN_CALLS)]
    await until(lambda: len(relay.core.held) == 2 * COALESCE_OPEN_CALLS, 5, "every call held")
    before = relay.servicer.messages
    trickle = []
    for i in range(20):  # one call per event-loop turn
        trickle.append(asyncio.ensure_future(relay.call(f"late {i}".encode())))
        await asyncio.sleep(0)
    assert await asyncio.gather(*trickle) == [f"late {i}".encode()[::-1] for i in range(20)]
    assert relay.servicer.messages - before <= 3, "calls arriving one per turn on a busy stream share messages"
    for future in relay.core.held[COALESCE_OPEN_CALLS:]:
        future.set_result(Raw(b"done"))
    await asyncio.gather(*held)


async def test_a_refused_or_failed_call_gets_its_own_status_and_message(relay: Relay) -> None:
    good, bad, failed = await asyncio.gather(
        relay.call(b"ok"), relay.call(b"bad"), relay.call(b"fail"), return_exceptions=True
    )
    assert good == b"ko"
    assert isinstance(bad, InvalidArgument) and bad.message == "bad request: say something else"
    assert isinstance(failed, Unavailable) and failed.message == "no worker"
    assert failed.origin == "", "the batcher's own failure names no origin: the router may retry it elsewhere"


async def test_a_failure_relayed_from_below_keeps_its_origin(relay: Relay) -> None:
    with pytest.raises(Unavailable) as caught:
        await relay.call(b"fail below")
    assert caught.value.origin == "object store s3:1"
    assert caught.value.message == "object store at s3:1 is unreachable"


async def test_a_caller_that_goes_away_withdraws_its_call_downstream(relay: Relay) -> None:
    call = asyncio.ensure_future(relay.call(b"hold"))
    await until(lambda: relay.core.held, 5, "the call held")
    call.cancel()
    held = relay.core.held[0]
    await until(held.cancelled, 5, "the server-side call withdrawn")
    assert await relay.call(b"still works") == b"skrow llits"


async def test_a_caller_whose_own_deadline_passes_withdraws_its_call(relay: Relay) -> None:
    with pytest.raises(asyncio.TimeoutError):  # as gRPC cancels a server handler at its deadline
        await asyncio.wait_for(relay.call(b"hold", timeout_s=0.2), 0.2)
    held = relay.core.held[0]
    await until(held.cancelled, 5, "the server-side call withdrawn")


async def test_a_peer_that_never_answers_fails_the_call_at_its_deadline_and_hears_it_withdrawn() -> None:
    """The peer ends each call at its deadline; one that does not (hung) is caught by the stream's sweep."""
    frames: list[relay_pb2.CallFrame] = []

    async def silent(requests: AsyncIterator[relay_pb2.CallFrames], context: object) -> AsyncIterator[relay_pb2.AnswerFrames]:
        async for message in requests:  # reads every frame, answers none
            frames.extend(message.calls)
        if False:  # pragma: no cover - a generator that yields nothing
            yield relay_pb2.AnswerFrames()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(RELAY_SERVICE, {
        "Calls": grpc.stream_stream_rpc_method_handler(
            silent, request_deserializer=relay_pb2.CallFrames.FromString,
            response_serializer=relay_pb2.AnswerFrames.SerializeToString,
        ),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = RelayClient(channel, "a hung batcher")
    try:
        patient = asyncio.ensure_future(client.call(METHOD, b"patient", [], None))  # no deadline: left alone
        with pytest.raises(DeadlineExceeded) as caught:
            await asyncio.wait_for(client.call(METHOD, b"short", [], 0.05), 30)
        assert "a hung batcher did not answer by the call's deadline" in caught.value.message
        await until(lambda: any(f.cancel for f in frames), 5, "the call withdrawn downstream")
        [short] = [f for f in frames if f.request == b"short"]
        assert [f.id for f in frames if f.cancel] == [short.id]
        assert not patient.done()
        patient.cancel()
    finally:
        await client.close()
        await channel.close()
        await server.stop(None)


async def test_a_broken_stream_fails_open_calls_unavailable_and_the_next_call_reopens_it() -> None:
    first = Relay(Core())
    await first.server.start()
    try:
        call = asyncio.ensure_future(first.call(b"hold"))
        await until(lambda: first.core.held, 5, "the call held")
        await first.server.stop(None)  # the batcher dies with a call open
        with pytest.raises(Unavailable, match="unavailable"):
            await call
        # A new batcher on the same port: the same client opens a new stream.
        second = grpc.aio.server()
        servicer = RelayServicer(Core().start, tier="batcher")
        second.add_generic_rpc_handlers([servicer.generic_handler()])
        assert second.add_insecure_port(f"127.0.0.1:{first.port}") == first.port
        await second.start()
        try:
            async def answered() -> bool:
                try:
                    return await first.call(b"again") == b"niaga"
                except Unavailable:
                    return False

            await until(answered, 10, "the relay reconnected", interval_s=0.1)  # the channel reconnects with backoff
        finally:
            await second.stop(None)
    finally:
        await first.client.close()
        await first.channel.close()


async def test_draining_refuses_new_calls_finishes_open_ones_then_ends_the_stream(relay: Relay) -> None:
    held_call = asyncio.ensure_future(relay.call(b"hold"))
    await until(lambda: relay.core.held, 5, "the call held")
    relay.servicer.drain()
    with pytest.raises(Unavailable, match="shutting down; retry on another replica"):
        await relay.call(b"new")
    relay.core.held[0].set_result(Raw(b"done"))
    assert await held_call == b"done"
    await until(lambda: not relay.client.stream_open, 5, "the stream ended once nothing was open")
    assert relay.client.open_calls == 0


async def test_admission_limits_relayed_calls_like_unary_ones() -> None:
    r = Relay(Core(), AdmissionLimit("the batcher of m", 1, "batcher.max_concurrent_calls"))
    await r.server.start()
    try:
        held = asyncio.ensure_future(r.call(b"hold"))
        await until(lambda: r.core.held, 5, "the call held")
        with pytest.raises(ResourceExhausted, match=r"limit of 1 concurrent calls \(batcher.max_concurrent_calls\)"):
            await r.call(b"second")
        r.core.held[0].set_result(Raw(b"x"))
        assert await held == b"x"
        assert await r.call(b"third") == b"driht", "the admitted call's place was given back"
    finally:
        await r.client.close()
        await r.channel.close()
        await r.server.stop(None)


def ended(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                  grpc.StatusCode.CANCELLED])
def test_a_stream_whose_transport_broke_fails_its_calls_unavailable_for_the_pools_to_retry(code: grpc.StatusCode) -> None:
    """INTERNAL included: grpc.aio's status for a write that raced the connection's end (a peer killed)."""
    error = stream_failure(ended(code, "Internal error from Core"), "127.0.0.1:9")
    assert isinstance(error, Unavailable) and "127.0.0.1:9" in error.message and not error.origin


def test_a_stream_the_peer_refused_fails_its_calls_with_the_peers_status() -> None:
    error = stream_failure(ended(grpc.StatusCode.UNAUTHENTICATED, "no client certificate"), "127.0.0.1:9")
    assert isinstance(error, Unauthenticated) and error.message == "no client certificate"
    assert isinstance(stream_failure(None, "127.0.0.1:9"), Unavailable), "a stream the peer ended OK: shutting down"
    assert isinstance(stream_failure(ConnectionResetError(), "127.0.0.1:9"), Unavailable)
