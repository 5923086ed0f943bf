"""ClassifyStream on the real stack: many Classify calls on one stream through the router.

The protocol is driven with the generated stub (client-chosen ids, raw
requests); ``FlotillaClient.classify_many`` and the load generator's stream
mode on top. The window is observed where it shows honestly: a policy that
holds requests in the batcher's queue (``test_batching_tier``'s way), and the
batcher's own count of arrivals, through a second router process of this
stack started with a small ``router.stream_window``.
"""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from flotilla.api.v1 import batcher_pb2, batcher_pb2_grpc, inference_pb2, inference_pb2_grpc
from flotilla.clients.api_calls import APIS, Api
from flotilla.clients.client import FlotillaClient
from flotilla.clients.loadgen import closed_loop
from flotilla.clients.loadtest import StackTarget
from flotilla.clients.results import Classification
from flotilla.common.probe import is_serving
from flotilla.common.wire import AUTH_HEADER, BEARER_PREFIX, MODEL_HEADER
from flotilla.config import dump_settings
from flotilla.errors import Code, FlotillaError
from flotilla.stack.local import LocalStack
from flotilla.stack.processes import ManagedProcess, free_port
from tests.integration.conftest import API_KEY, MODEL, admin_channel, sample
from tests.waiting import until, until_sync

WINDOW = 5
"""router.stream_window of the second router (below the held batch size, so held requests stay queued)."""
HOLD_DELAY_US = 300_000_000  # 300 s: nothing leaves the queue unless the test lets it (longer than any wait here)
SAMPLES = ("chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "motorcycle_left.jpg")
OK = grpc.StatusCode.OK.value[0]

Call = grpc.aio.StreamStreamCall[inference_pb2.ClassifyStreamRequest, inference_pb2.ClassifyStreamResponse]


@pytest.fixture
async def uuids(client: FlotillaClient) -> list[str]:
    return [await client.upload(sample(name)) for name in SAMPLES]


@pytest.fixture
async def channel(stack: LocalStack) -> AsyncIterator[grpc.aio.Channel]:
    assert stack.state is not None
    async with grpc.aio.insecure_channel(stack.state.router) as opened:
        yield opened


def open_stream(channel: grpc.aio.Channel, *, key: str = API_KEY, model: str = MODEL) -> Call:
    stub = inference_pb2_grpc.ImageClassifierStub(channel)
    return stub.ClassifyStream(metadata=((MODEL_HEADER, model), (AUTH_HEADER, f"{BEARER_PREFIX}{key}")))


def request(
    stream_id: str, image_uuid: str, *, model: str = "", timeout_ms: int = 0
) -> inference_pb2.ClassifyStreamRequest:
    return inference_pb2.ClassifyStreamRequest(
        id=stream_id, request=inference_pb2.ClassifyRequest(image_uuid=image_uuid),
        model_name=model, timeout_ms=timeout_ms,
    )


async def exchange(
    call: Call, requests: Sequence[inference_pb2.ClassifyStreamRequest]
) -> tuple[list[inference_pb2.ClassifyStreamResponse], grpc.StatusCode]:
    """Send every request, close the sending side, read every answer: (answers in arrival order, status)."""
    for message in requests:
        await call.write(message)
    await call.done_writing()
    answers = [answer async for answer in call]
    return answers, await call.code()


def by_id(answers: Sequence[inference_pb2.ClassifyStreamResponse]) -> dict[str, inference_pb2.ClassifyStreamResponse]:
    found = {a.id: a for a in answers}
    assert len(found) == len(answers), "an id was answered twice"
    return found


def assert_answered_as_unary(
    answered: dict[str, inference_pb2.ClassifyStreamResponse],
    requests: Sequence[inference_pb2.ClassifyStreamRequest],
    unary_top1: dict[str, int],
) -> None:
    """Every request answered, by its id, with its image and unary Classify's top-1 for it."""
    assert set(answered) == {r.id for r in requests}
    for sent in requests:
        answer = answered[sent.id]
        assert answer.WhichOneof("outcome") == "response", answer
        assert answer.response.image_uuid == sent.request.image_uuid
        assert answer.response.classes[0].index == unary_top1[sent.request.image_uuid]


async def test_many_requests_on_one_stream_are_answered_by_id_as_unary_classify_answers(
    client: FlotillaClient, channel: grpc.aio.Channel, uuids: list[str]
) -> None:
    unary_top1 = {u: (await client.classify(u, MODEL)).classes[0].index for u in uuids}
    requests = [request(f"{name}#{copy}", u) for copy in range(8) for name, u in zip(SAMPLES, uuids, strict=True)]

    answers, status = await exchange(open_stream(channel), requests)

    assert status == grpc.StatusCode.OK
    assert_answered_as_unary(by_id(answers), requests, unary_top1)


async def test_a_bad_request_is_answered_with_its_own_error_and_the_others_succeed(
    channel: grpc.aio.Channel, uuids: list[str]
) -> None:
    requests = [
        request("good-1", uuids[0]),
        request("bad-uuid", "not-a-uuid"),
        request("no-such-model", uuids[1], model="no-such-model"),
        request("good-2", uuids[2]),
    ]

    answers, status = await exchange(open_stream(channel), requests)

    assert status == grpc.StatusCode.OK
    answered = by_id(answers)
    assert answered["bad-uuid"].error.code == Code.INVALID_ARGUMENT
    assert answered["no-such-model"].error.code == Code.NOT_FOUND
    assert "no-such-model" in answered["no-such-model"].error.message
    for good in ("good-1", "good-2"):
        assert answered[good].WhichOneof("outcome") == "response", answered[good]


async def test_a_bad_key_ends_the_stream_unauthenticated(channel: grpc.aio.Channel, uuids: list[str]) -> None:
    call = open_stream(channel, key="not-the-key")
    # The router refuses the stream as it opens, before any request. The status is read first: a write
    # racing the refusal can fail on the client's side (grpc.aio's "Internal error from Core") and
    # leave the call's own status INTERNAL before the router's arrives.
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises((grpc.aio.AioRpcError, asyncio.InvalidStateError)):
        await exchange(call, [request("1", uuids[0])])


async def test_the_sender_closing_ends_the_stream_once_every_request_is_answered(
    channel: grpc.aio.Channel, uuids: list[str]
) -> None:
    call = open_stream(channel)
    for i, image_uuid in enumerate(uuids):
        await call.write(request(str(i), image_uuid))
    await call.done_writing()  # at once: the answers are all still to come

    answers = [answer async for answer in call]
    assert await call.code() == grpc.StatusCode.OK
    assert sorted(by_id(answers)) == [str(i) for i in range(len(uuids))]
    assert all(a.WhichOneof("outcome") == "response" for a in answers)


@pytest.fixture
async def admin(stack: LocalStack) -> AsyncIterator[batcher_pb2_grpc.BatcherAdminStub]:
    """The batcher's admin API; its original policy is restored afterwards."""
    async with admin_channel(stack, stack.batchers[MODEL].address) as opened:
        stub = batcher_pb2_grpc.BatcherAdminStub(opened)
        original = await stub.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
        try:
            yield stub
        finally:
            await stub.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=original))


async def hold_queue(admin: batcher_pb2_grpc.BatcherAdminStub) -> None:
    policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
    policy.max_batch_size = 64
    policy.max_queue_delay_us = HOLD_DELAY_US
    await admin.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy))


async def release(admin: batcher_pb2_grpc.BatcherAdminStub) -> None:
    policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
    policy.max_queue_delay_us = 0
    await admin.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy))


async def arrivals(admin: batcher_pb2_grpc.BatcherAdminStub) -> int:
    """Classify calls the model's batcher has received, ever (its own count)."""
    return int((await admin.GetStats(batcher_pb2.GetStatsRequest(model_name=MODEL))).total_arrivals)


async def test_a_request_past_its_own_deadline_is_answered_deadline_exceeded_first_and_the_stream_goes_on(
    channel: grpc.aio.Channel, admin: batcher_pb2_grpc.BatcherAdminStub, uuids: list[str]
) -> None:
    await hold_queue(admin)  # nothing is answered until released: the 200 ms deadline passes in the queue
    call = open_stream(channel)
    await call.write(request("patient", uuids[1]))
    await call.write(request("short", uuids[0], timeout_ms=200))

    # Patient, sent first, is held: the first answer can only be short's, out of order (60 s bounds a failure).
    first = await asyncio.wait_for(call.read(), 60)
    assert isinstance(first, inference_pb2.ClassifyStreamResponse)
    assert first.id == "short" and first.error.code == Code.DEADLINE_EXCEEDED
    await release(admin)
    await call.done_writing()
    rest = []
    while (answer := await call.read()) is not grpc.aio.EOF:
        assert isinstance(answer, inference_pb2.ClassifyStreamResponse)
        rest.append(answer)
    assert [a.id for a in rest] == ["patient"] and rest[0].WhichOneof("outcome") == "response"
    assert await call.code() == grpc.StatusCode.OK


async def arrivals_reached(admin: batcher_pb2_grpc.BatcherAdminStub, count: int) -> bool:
    return await arrivals(admin) >= count


async def queue_depth(admin: batcher_pb2_grpc.BatcherAdminStub) -> int:
    return int((await admin.GetStats(batcher_pb2.GetStatsRequest(model_name=MODEL))).queue_depth)


async def test_a_caller_cancelling_its_stream_withdraws_its_requests_from_the_batcher(
    channel: grpc.aio.Channel, admin: batcher_pb2_grpc.BatcherAdminStub, uuids: list[str]
) -> None:
    await hold_queue(admin)
    call = open_stream(channel)
    for i, image_uuid in enumerate(uuids[:3]):
        await call.write(request(str(i), image_uuid))

    async def depth_is(count: int) -> bool:
        return await queue_depth(admin) == count

    await until(lambda: depth_is(3), 30, "the three requests queued at the batcher")
    call.cancel()
    await until(lambda: depth_is(0), 30, "the cancelled stream's requests withdrawn from the queue")


@pytest.fixture
def windowed_router(stack: LocalStack, tmp_path: Path) -> Iterator[ManagedProcess]:
    """A second router of this stack, with ``router.stream_window`` = WINDOW; stopped afterwards."""
    assert stack.settings is not None
    settings = stack.settings.model_copy(
        # Its own gRPC port, and no HTTP front door (the first router's HTTP port is taken).
        update={"router": stack.settings.router.model_copy(update={"stream_window": WINDOW, "http_port": 0})}
    )
    config = tmp_path / "router.yaml"
    dump_settings(settings, config)
    proc = stack.service("router-windowed", "router", f"{settings.host}:{free_port(settings.host)}", config)
    try:
        until_sync(lambda: proc.address is not None and is_serving(proc.address), 60, "the second router serving")
        yield proc
    finally:
        proc.stop()


async def assert_a_window_taken_then_every_request_answered(
    address: str, admin: batcher_pb2_grpc.BatcherAdminStub, sent: int, write: Callable[[Call], Awaitable[None]]
) -> None:
    """With the batcher answering nothing (the router's window stays full), ``write`` sends requests
    with ids "0" to ``sent - 1`` on a new stream: exactly a window of them reaches the batcher; once it
    answers again, every request is answered and the stream ends OK."""
    await hold_queue(admin)
    before = await arrivals(admin)
    async with grpc.aio.insecure_channel(address) as router:
        call = open_stream(router)
        await write(call)
        await until(lambda: arrivals_reached(admin, before + WINDOW), 30, "a window of requests at the batcher")
        assert await arrivals(admin) - before == WINDOW
        assert await queue_depth(admin) == WINDOW

        await release(admin)
        await call.done_writing()
        messages = [message async for message in call]
        assert await call.code() == grpc.StatusCode.OK
    answers = unpacked(messages)
    assert sorted(int(i) for i in by_id(answers)) == list(range(sent))
    assert all(a.WhichOneof("outcome") == "response" for a in answers)
    assert await arrivals(admin) - before == sent


async def test_a_fast_sender_gets_no_more_than_the_window_in_flight_at_the_router(
    windowed_router: ManagedProcess, admin: batcher_pb2_grpc.BatcherAdminStub, uuids: list[str]
) -> None:
    assert windowed_router.address is not None
    sent = 8 * WINDOW

    async def write(call: Call) -> None:
        for i in range(sent):  # far more than the window; writes are buffered by HTTP/2, not read by the router
            await call.write(request(str(i), uuids[i % len(uuids)]))

    # The router takes a window's worth and stops reading: nothing more reaches the batcher.
    await assert_a_window_taken_then_every_request_answered(windowed_router.address, admin, sent, write)


async def test_a_router_stopping_answers_every_request_it_took_then_ends_the_stream_unavailable(
    windowed_router: ManagedProcess, admin: batcher_pb2_grpc.BatcherAdminStub, uuids: list[str]
) -> None:
    assert windowed_router.address is not None and windowed_router.pid is not None
    sent = 4 * WINDOW
    await hold_queue(admin)
    before = await arrivals(admin)
    async with grpc.aio.insecure_channel(windowed_router.address) as router:
        call = open_stream(router)
        for i in range(sent):
            await call.write(request(str(i), uuids[i % len(uuids)]))
        await until(lambda: arrivals_reached(admin, before + WINDOW), 30, "a window of requests at the batcher")

        os.kill(windowed_router.pid, signal.SIGTERM)  # the router drains: it takes no more requests
        address = windowed_router.address
        until_sync(lambda: not is_serving(address), 30, "the router going NOT_SERVING")
        await release(admin)
        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for answer in call:
                answers.append(answer)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # Every request the router took (what reached the batcher through it) was answered, and answered OK.
    taken = await arrivals(admin) - before
    assert WINDOW <= taken < sent
    assert len(by_id(answers)) == taken
    assert all(a.WhichOneof("outcome") == "response" for a in answers)



# -- packed messages: several requests in one ClassifyStreamRequest, several answers in one response --


def packed(
    *requests: inference_pb2.ClassifyStreamRequest, own: inference_pb2.ClassifyStreamRequest | None = None
) -> inference_pb2.ClassifyStreamRequest:
    """One message packing ``requests`` (``requests``); ``own``: the message's own request as well."""
    message = inference_pb2.ClassifyStreamRequest()
    if own is not None:
        message.CopyFrom(own)
    message.requests.extend(requests)
    return message


def unpacked(messages: Sequence[inference_pb2.ClassifyStreamResponse]) -> list[inference_pb2.ClassifyStreamResponse]:
    """Every answer the messages carry: a packed message's ``responses``, or the message itself."""
    answers: list[inference_pb2.ClassifyStreamResponse] = []
    for message in messages:
        if message.responses:
            assert not message.id and message.WhichOneof("outcome") is None, "a packed message sets its own fields"
            assert not any(a.responses for a in message.responses), "packed answers pack again"
            answers.extend(message.responses)
        else:
            answers.append(message)
    return answers


async def read_one(call: Call) -> inference_pb2.ClassifyStreamResponse:
    message = await asyncio.wait_for(call.read(), 60)  # 60 s bounds a failure
    assert isinstance(message, inference_pb2.ClassifyStreamResponse), message
    return message


async def read_rest(call: Call) -> list[inference_pb2.ClassifyStreamResponse]:
    """Every message still to come, by ``read`` (a call read with it cannot be iterated as well)."""
    messages = []
    while (message := await asyncio.wait_for(call.read(), 60)) is not grpc.aio.EOF:
        assert isinstance(message, inference_pb2.ClassifyStreamResponse), message
        messages.append(message)
    return messages


async def test_a_packed_message_has_each_request_answered_as_if_alone_and_the_answers_come_back_packed(
    client: FlotillaClient, channel: grpc.aio.Channel, admin: batcher_pb2_grpc.BatcherAdminStub, uuids: list[str]
) -> None:
    unary_top1 = {u: (await client.classify(u, MODEL)).classes[0].index for u in uuids}
    good = [request(f"{name}#{copy}", u) for copy in range(2) for name, u in zip(SAMPLES, uuids, strict=True)]
    await hold_queue(admin)  # the good ones wait in the queue, to be answered together
    call = open_stream(channel)
    await call.write(packed(*good[:3], request("bad-uuid", "not-a-uuid"), *good[3:]))

    # The bad one is refused at once while the good ones are held: a single answer ready goes alone.
    first = await read_one(call)
    assert not first.responses and first.id == "bad-uuid", first
    assert first.error.code == Code.INVALID_ARGUMENT

    async def all_queued() -> bool:
        return await queue_depth(admin) == len(good)

    await until(all_queued, 30, "every good packed request queued at the batcher")
    await release(admin)  # one batch: their answers are ready together
    await call.done_writing()
    messages = await read_rest(call)
    assert await call.code() == grpc.StatusCode.OK

    assert any(m.responses for m in messages), [m.id for m in messages]  # the sender packed: so does the router
    assert_answered_as_unary(by_id(unpacked(messages)), good, unary_top1)


async def test_a_sender_that_never_packs_never_gets_packed_answers(
    channel: grpc.aio.Channel, admin: batcher_pb2_grpc.BatcherAdminStub, uuids: list[str]
) -> None:
    requests = [request(str(i), uuids[i % len(uuids)]) for i in range(2 * len(uuids))]
    await hold_queue(admin)
    call = open_stream(channel)
    for sent in requests:
        await call.write(sent)

    async def all_queued() -> bool:
        return await queue_depth(admin) == len(requests)

    await until(all_queued, 30, "every request queued at the batcher")
    await release(admin)  # their answers are ready together, yet each goes as its own message
    await call.done_writing()
    answers = [answer async for answer in call]

    assert await call.code() == grpc.StatusCode.OK
    assert not any(a.responses for a in answers)
    assert sorted(by_id(answers)) == sorted(r.id for r in requests)
    assert all(a.WhichOneof("outcome") == "response" for a in answers)


async def test_a_message_with_its_own_request_and_packed_ones_has_every_one_answered(
    channel: grpc.aio.Channel, uuids: list[str]
) -> None:
    own = request("own", uuids[0])
    packs = [request(f"packed-{i}", u) for i, u in enumerate(uuids[1:])]
    second = packed(request("second-packed", uuids[0]), own=request("second-own", uuids[1], model=MODEL))

    messages, status = await exchange(open_stream(channel), [packed(*packs, own=own), second])

    assert status == grpc.StatusCode.OK
    answered = by_id(unpacked(messages))
    sent = [own, *packs, *second.requests, request("second-own", uuids[1])]
    assert set(answered) == {r.id for r in sent}
    for one in sent:
        assert answered[one.id].WhichOneof("outcome") == "response", answered[one.id]
        assert answered[one.id].response.image_uuid == one.request.image_uuid


async def test_a_packed_request_that_packs_again_is_refused_under_its_own_id_and_the_stream_goes_on(
    channel: grpc.aio.Channel, uuids: list[str]
) -> None:
    nested = packed(request("inner", uuids[1]), own=request("nested", uuids[0]))
    message = packed(request("before", uuids[2]), nested, request("after", uuids[3]))

    messages, status = await exchange(open_stream(channel), [message, request("later", uuids[4])])

    assert status == grpc.StatusCode.OK
    answered = by_id(unpacked(messages))
    assert set(answered) == {"before", "nested", "after", "later"}  # "inner" was not taken
    assert answered["nested"].error.code == Code.INVALID_ARGUMENT
    assert "pack" in answered["nested"].error.message, answered["nested"].error.message
    for good in ("before", "after", "later"):
        assert answered[good].WhichOneof("outcome") == "response", answered[good]


async def test_a_packed_message_is_taken_no_more_than_the_window_at_a_time(
    windowed_router: ManagedProcess, admin: batcher_pb2_grpc.BatcherAdminStub, uuids: list[str]
) -> None:
    assert windowed_router.address is not None
    sent = 3 * WINDOW

    async def write(call: Call) -> None:
        await call.write(packed(*(request(str(i), uuids[i % len(uuids)]) for i in range(sent))))

    # The message is read whole, but only a window of its requests is taken.
    await assert_a_window_taken_then_every_request_answered(windowed_router.address, admin, sent, write)


class RecordingHop(inference_pb2_grpc.ImageClassifierServicer):
    """A ClassifyStream hop between a client and the stack's router: passes the router's initial
    metadata and each message on as they came, and records the messages each way."""

    def __init__(self, router: grpc.aio.Channel) -> None:
        self.stub = inference_pb2_grpc.ImageClassifierStub(router)
        self.pass_initial_metadata = True
        """Off: the hop plays a router from before packing (its initial metadata does not say it packs)."""
        self.requests: list[inference_pb2.ClassifyStreamRequest] = []
        self.responses: list[inference_pb2.ClassifyStreamResponse] = []

    async def ClassifyStream(  # noqa: N802 (the servicer's name)
        self,
        requests: AsyncIterator[inference_pb2.ClassifyStreamRequest],
        context: grpc.aio.ServicerContext[inference_pb2.ClassifyStreamRequest, inference_pb2.ClassifyStreamResponse],
    ) -> AsyncIterator[inference_pb2.ClassifyStreamResponse]:
        passed = (MODEL_HEADER, AUTH_HEADER)
        call = self.stub.ClassifyStream(metadata=[(k, v) for k, v in context.invocation_metadata() or () if k in passed])

        async def pass_requests() -> None:
            async for message in requests:
                self.requests.append(message)
                await call.write(message)
            await call.done_writing()

        passing = asyncio.create_task(pass_requests())
        try:
            headers = tuple(await call.initial_metadata() or ())
            await context.send_initial_metadata(headers if self.pass_initial_metadata else ())  # the router's, as it came
            async for answer in call:
                self.responses.append(answer)
                yield answer
        finally:
            passing.cancel()
            await asyncio.gather(passing, return_exceptions=True)


@pytest.fixture
async def hop(stack: LocalStack, channel: grpc.aio.Channel) -> AsyncIterator[tuple[str, RecordingHop]]:
    """(address, hop): a recording hop to the stack's router, served in this process."""
    recorder = RecordingHop(channel)
    server = grpc.aio.server()
    inference_pb2_grpc.add_ImageClassifierServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        await server.stop(None)


async def test_many_concurrent_classifications_on_one_client_stream_go_packed_and_each_is_answered(
    client: FlotillaClient, stack: LocalStack, hop: tuple[str, RecordingHop], uuids: list[str]
) -> None:
    assert stack.settings is not None
    address, recorder = hop
    unary_top1 = {u: (await client.classify(u, MODEL)).classes[0].index for u in uuids}
    items = [uuids[i % len(uuids)] for i in range(40)]
    items[17] = "not-a-uuid"

    async with FlotillaClient(address, API_KEY, stack.settings.s3) as through_hop, through_hop.stream(MODEL) as stream:
        # Queued in one turn of the loop, while the stream's first write is under way: the client packs them.
        results = await asyncio.gather(*(stream.classify(item) for item in items), return_exceptions=True)

    for item, result in zip(items, results, strict=True):
        if item == "not-a-uuid":
            assert isinstance(result, FlotillaError) and result.code == Code.INVALID_ARGUMENT, result
            continue
        assert isinstance(result, Classification), result
        assert result.image_uuid == item
        assert result.classes[0].index == unary_top1[item]
    # What went over the wire: the client packed, the router packed its answers back, and the
    # client read them (every result above came through ``recorder.responses``).
    assert any(len(m.requests) > 1 for m in recorder.requests), [len(m.requests) for m in recorder.requests]
    assert sum(len(m.requests) or 1 for m in recorder.requests) == len(items)
    assert any(m.responses for m in recorder.responses), [len(m.responses) for m in recorder.responses]
    assert len(unpacked(recorder.responses)) == len(items)



async def test_a_client_packs_only_for_a_router_that_says_it_takes_packed_requests(
    stack: LocalStack, hop: tuple[str, RecordingHop], uuids: list[str]
) -> None:
    assert stack.settings is not None
    address, recorder = hop
    recorder.pass_initial_metadata = False  # as a router from before packing answers
    items = [uuids[i % len(uuids)] for i in range(20)]

    async with FlotillaClient(address, API_KEY, stack.settings.s3) as through_hop, through_hop.stream(MODEL) as stream:
        results = await asyncio.gather(*(stream.classify(item) for item in items))

    assert [r.image_uuid for r in results] == items
    assert [len(m.requests) for m in recorder.requests] == [0] * len(items), "one request a message"
    assert not any(m.responses for m in recorder.responses)


async def test_classify_many_uploads_and_classifies_jpegs_and_yields_each_result(client: FlotillaClient) -> None:
    jpegs = [sample(name) for name in SAMPLES] * 3
    unary = {name: (await client.classify_jpeg(sample(name), MODEL)).classes[0].index for name in SAMPLES}

    results = [r async for r in client.classify_many(jpegs, MODEL, window=4)]

    assert sorted(r.index for r in results) == list(range(len(jpegs)))
    for result in results:
        classification = result.unwrap()
        assert classification.image_uuid == result.image_uuid
        assert classification.classes[0].index == unary[SAMPLES[result.index % len(SAMPLES)]]
    assert len({r.image_uuid for r in results}) == len(jpegs)  # each JPEG uploaded as its own object


async def test_classify_many_with_uuids_reports_a_bad_one_as_its_result_and_goes_on(
    client: FlotillaClient, uuids: list[str]
) -> None:
    items = [*uuids[:2], "not-a-uuid", *uuids[2:]]

    results = {r.index: r async for r in client.classify_many(items, MODEL, window=2)}

    assert sorted(results) == list(range(len(items)))
    bad = results[2]
    assert bad.classification is None and bad.error is not None and bad.error.code == Code.INVALID_ARGUMENT
    for index, item in enumerate(items):
        if index != 2:
            assert results[index].ok and results[index].image_uuid == item


@pytest.mark.parametrize("api", APIS)
async def test_the_load_generator_drives_each_front_door(stack: LocalStack, uuids: list[str], api: Api) -> None:
    """What ``flotilla loadtest --api`` runs for each point: a closed loop through the door."""
    assert stack.state is not None
    target = StackTarget(stack.state)
    try:
        call = target.api_call(api, MODEL, uuids, concurrency=8)
        result = await closed_loop(call, concurrency=8, duration_s=1.0)
    finally:
        await target.close()
    assert result.succeeded > 0 and result.failed == 0, result.errors


async def test_the_load_generator_counts_a_front_doors_failures_by_status(stack: LocalStack, uuids: list[str]) -> None:
    assert stack.state is not None
    target = StackTarget(stack.state)
    try:
        for api in APIS:
            result = await closed_loop(target.api_call(api, "no-such-model", uuids), concurrency=1, duration_s=0.2)
            assert result.succeeded == 0 and set(result.errors) == {"NOT_FOUND"}, (api, result.errors)
    finally:
        await target.close()


def test_flotilla_loadtest_runs_over_the_stream(stack: LocalStack, tmp_path: Path) -> None:
    """``flotilla loadtest --api stream`` end to end, one short point: every request answered."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "chelsea.jpg").write_bytes(sample("chelsea.jpg"))
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "flotilla", "loadtest", "--api", "stream", "--model", MODEL, "--state",
         str(stack.state_file), "--images", str(images), "--out", str(out), "--batch-sizes", "8",
         "--concurrency", "4", "--duration-s", "0.5"],
        check=True, timeout=300,
    )
    with open(out / "results.csv", newline="") as results:
        rows = list(csv.DictReader(results))
    assert [(r["api"], r["concurrency"]) for r in rows] == [("stream", "4")]
    assert int(rows[0]["succeeded"]) > 0 and int(rows[0]["errors"]) == 0


def test_flotilla_infer_classifies_its_images_over_the_stream_and_reports_each_in_order(
    stack: LocalStack, tmp_path: Path
) -> None:
    files = []
    for name in ("coffee.jpg", "not-a-photo.jpg", "chelsea.jpg"):
        path = tmp_path / name
        path.write_bytes(b"not a JPEG" if name == "not-a-photo.jpg" else sample(name))
        files.append(str(path))
    done = subprocess.run(
        [sys.executable, "-m", "flotilla", "infer", *files, "--model", MODEL, "--state", str(stack.state_file)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1, done.stderr  # one image failed
    titles = [line.split()[0] for line in done.stdout.splitlines() if not line.startswith(" ")]
    assert titles == ["coffee.jpg", "not-a-photo.jpg:", "chelsea.jpg"], done.stdout
    assert "not-a-photo.jpg: FAILED (INVALID_ARGUMENT)" in done.stdout
    assert done.stdout.count("  1. ") == 2
