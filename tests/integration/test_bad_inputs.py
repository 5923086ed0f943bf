"""The bad-input matrix on the real stack.

Every bad request gets its own exact status and a message a person can act
on (it names the uuid, the limit, the header...). Bad images fail alone: the
good requests that share their batch still get their answers. And after the
whole matrix every Flotilla service is still up and SERVING.

The module's tests run in file order; the log and health checks are last on purpose.
"""

from __future__ import annotations

import asyncio
import io
import re
import struct
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from PIL import Image

from flotilla.api.v1 import batcher_pb2, batcher_pb2_grpc, inference_pb2
from flotilla.clients.client import Classification, FlotillaClient
from flotilla.common.probe import is_serving
from flotilla.errors import Code, FlotillaError
from flotilla.stack.local import LocalStack
from tests.integration.conftest import (
    API_KEY,
    MAX_BATCH_SIZE,
    MAX_IMAGE_PIXELS,
    MAX_OBJECT_BYTES,
    MODEL,
    admin_channel,
    sample,
)

CLASSIFY = "/flotilla.api.v1.ImageClassifier/Classify"
# Not a protobuf message: field 31, wire type 7 does not exist.
NOT_PROTOBUF = b"\xff\xff\xff\xff\x0f raw bytes only a parser would choke on \x00\x01"
# What each good photo's top-1 class must be.
EXPECTED_TOP1 = {
    "coffee.jpg": {967, 968},  # espresso, cup
    "chelsea.jpg": set(range(281, 286)),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
}
BOMB_SIDE = 20_000
# Long enough that a batch only leaves once it is full: the test decides what shares it.
HOLD_DELAY_US = 10_000_000
# Rounds of 200 requests expiring together (see the deadline race test).
RACE_ROUNDS = 60


# -- bad objects ---------------------------------------------------------------


def png_photo() -> bytes:
    """A real photo, re-encoded as PNG."""
    out = io.BytesIO()
    Image.open(io.BytesIO(sample("coffee.jpg"))).save(out, "PNG")
    return out.getvalue()


def cut_in_half() -> bytes:
    jpeg = sample("coffee.jpg")
    return jpeg[: len(jpeg) // 2]


def cut_in_header() -> bytes:
    """Only the first 300 bytes: the upload stopped inside the JPEG header."""
    return sample("coffee.jpg")[:300]


def bomb(*, progressive: bool) -> bytes:
    """A small real JPEG whose SOF0/SOF2 header claims BOMB_SIDE x BOMB_SIDE pixels."""
    out = io.BytesIO()
    Image.open(io.BytesIO(sample("coffee.jpg"))).resize((64, 48)).save(out, "JPEG", progressive=progressive)
    data = bytearray(out.getvalue())
    i = 2  # after SOI
    while i + 4 <= len(data):
        assert data[i] == 0xFF, f"no marker at offset {i}"
        marker = data[i + 1]
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in (0xC0, 0xC2):
            # FF Cx, length (2), precision (1), height (2), width (2)
            data[i + 5 : i + 9] = struct.pack(">HH", BOMB_SIDE, BOMB_SIDE)
            assert marker == (0xC2 if progressive else 0xC0)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF0/SOF2 marker in the encoded JPEG")


def padded_jpeg(size: int) -> bytes:
    """A real JPEG followed by zero bytes after its EOI marker, ``size`` bytes in all."""
    jpeg = sample("coffee.jpg")
    assert jpeg.endswith(b"\xff\xd9") and size >= len(jpeg)
    return jpeg + b"\x00" * (size - len(jpeg))


TOO_BIG = MAX_OBJECT_BYTES + MAX_OBJECT_BYTES // 4  # 2.5 MiB


@dataclass(frozen=True)
class BadObject:
    """A stored object (or none at all) that Classify must reject on its own."""

    name: str
    make: Callable[[], bytes | None]
    """The object's bytes; None: the uuid is never uploaded."""
    code: Code
    facts: tuple[str, ...]
    """What the message must say; ``{uuid}`` stands for the request's uuid."""


BAD_OBJECTS = [
    BadObject("png-not-jpeg", png_photo, Code.INVALID_ARGUMENT, ("{uuid}", "not a JPEG", "89 50 4e 47")),
    BadObject("truncated-half", cut_in_half, Code.INVALID_ARGUMENT, ("{uuid}", "truncated or corrupt")),
    BadObject("truncated-in-header", cut_in_header, Code.INVALID_ARGUMENT, ("{uuid}", "unreadable JPEG header")),
    BadObject("zero-bytes", lambda: b"", Code.INVALID_ARGUMENT, ("{uuid}", "empty", "0 bytes")),
    BadObject(
        "bomb-baseline-sof0",
        lambda: bomb(progressive=False),
        Code.INVALID_ARGUMENT,
        ("{uuid}", f"{BOMB_SIDE}x{BOMB_SIDE}", str(BOMB_SIDE * BOMB_SIDE), str(MAX_IMAGE_PIXELS)),
    ),
    BadObject(
        "bomb-progressive-sof2",
        lambda: bomb(progressive=True),
        Code.INVALID_ARGUMENT,
        ("{uuid}", f"{BOMB_SIDE}x{BOMB_SIDE}", str(BOMB_SIDE * BOMB_SIDE), str(MAX_IMAGE_PIXELS)),
    ),
    BadObject(
        "over-byte-limit",
        lambda: padded_jpeg(TOO_BIG),
        Code.INVALID_ARGUMENT,
        ("{uuid}", str(TOO_BIG), str(MAX_OBJECT_BYTES)),
    ),
    BadObject(
        "one-byte-over-limit",
        lambda: padded_jpeg(MAX_OBJECT_BYTES + 1),
        Code.INVALID_ARGUMENT,
        ("{uuid}", str(MAX_OBJECT_BYTES)),
    ),
    BadObject("never-uploaded", lambda: None, Code.NOT_FOUND, ("{uuid}", "upload")),
]


async def store(client: FlotillaClient, obj: BadObject) -> str:
    data = obj.make()
    return str(uuid.uuid4()) if data is None else await client.upload(data)


def assert_rejected(error: BaseException | Classification, obj: BadObject, image_uuid: str) -> None:
    assert isinstance(error, FlotillaError), f"{obj.name} was not rejected: {error!r}"
    assert error.code == obj.code, f"{obj.name}: {error.code.name}: {error.message}"
    for fact in obj.facts:
        assert fact.format(uuid=image_uuid) in error.message, (obj.name, fact, error.message)


def assert_good(result: BaseException | Classification, photo: str, image_uuid: str) -> None:
    assert isinstance(result, Classification), f"good {photo} failed: {result!r}"
    assert result.image_uuid == image_uuid
    assert result.classes[0].index in EXPECTED_TOP1[photo], (photo, result.classes)


# -- fixtures --------------------------------------------------------------------


@pytest.fixture
async def raw(stack: LocalStack) -> AsyncIterator[grpc.aio.UnaryUnaryMultiCallable]:
    """Classify on the real router with bytes in and bytes out: any headers, any body."""
    assert stack.state is not None
    async with grpc.aio.insecure_channel(stack.state.router) as channel:
        yield channel.unary_unary(CLASSIFY)


@pytest.fixture
async def admin(stack: LocalStack) -> AsyncIterator[batcher_pb2_grpc.BatcherAdminStub]:
    """The batcher's admin API; its original policy is restored afterwards."""
    assert stack.state is not None
    async with admin_channel(stack, stack.batchers[MODEL].address) as channel:
        stub = batcher_pb2_grpc.BatcherAdminStub(channel)
        original = await stub.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
        try:
            yield stub
        finally:
            await stub.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=original))


def valid_body(image_uuid: str | None = None) -> bytes:
    return inference_pb2.ClassifyRequest(
        image_uuid=image_uuid or str(uuid.uuid4()), model_name=MODEL
    ).SerializeToString()


async def raw_error(call: grpc.aio.UnaryUnaryMultiCallable, body: bytes, **kwargs: object) -> grpc.aio.AioRpcError:
    kwargs.setdefault("timeout", 10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(body, **kwargs)
    return caught.value


@pytest.fixture(scope="module")
def log_offsets(stack: LocalStack) -> dict[str, int]:
    """Where each Flotilla service's log stood before this module's first test."""
    return {p.name: p.log_path.stat().st_size if p.log_path.exists() else 0 for p in stack.flotilla_services()}


@pytest.fixture(autouse=True)
def _mark_logs(log_offsets: dict[str, int]) -> None:
    """Instantiates ``log_offsets`` with the first test of the module."""


# A service log record starts with its timestamp (flotilla's logging format).
_RECORD_START = re.compile(r"^(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )", re.MULTILINE)


def log_since(path: Path, offset: int) -> str:
    with open(path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def traceback_records(text: str) -> list[str]:
    return [record for record in _RECORD_START.split(text) if "Traceback" in record]


# -- 1-6: bad stored objects -------------------------------------------------------


@pytest.mark.parametrize("obj", BAD_OBJECTS, ids=lambda o: o.name)
async def test_bad_object_is_rejected_with_an_actionable_message(client: FlotillaClient, obj: BadObject) -> None:
    image_uuid = await store(client, obj)
    with pytest.raises(FlotillaError) as caught:
        await client.classify(image_uuid, MODEL, timeout_s=30)
    assert_rejected(caught.value, obj, image_uuid)


async def test_object_exactly_at_the_byte_limit_is_classified(client: FlotillaClient) -> None:
    image_uuid = await client.upload(padded_jpeg(MAX_OBJECT_BYTES))
    assert_good(await client.classify(image_uuid, MODEL, timeout_s=30), "coffee.jpg", image_uuid)


@pytest.mark.parametrize("obj", BAD_OBJECTS, ids=lambda o: o.name)
async def test_bad_object_fails_alone_in_a_shared_batch(
    client: FlotillaClient, admin: batcher_pb2_grpc.BatcherAdminStub, obj: BadObject
) -> None:
    """One bad request among MAX_BATCH_SIZE - 1 good ones, all in one batch."""
    photos = [("coffee.jpg", "chelsea.jpg")[i % 2] for i in range(MAX_BATCH_SIZE - 1)]
    good = [await client.upload(sample(p)) for p in photos]
    bad = await store(client, obj)
    middle = len(good) // 2
    uuids = [*good[:middle], bad, *good[middle:]]

    # The batch leaves when it is full, not at the delay: all of these share it.
    policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
    policy.max_batch_size = len(uuids)
    policy.max_queue_delay_us = HOLD_DELAY_US
    await admin.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy))
    before = await admin.GetStats(batcher_pb2.GetStatsRequest(model_name=MODEL))
    results = await asyncio.gather(
        *(client.classify(u, MODEL, timeout_s=30) for u in uuids), return_exceptions=True
    )
    after = await admin.GetStats(batcher_pb2.GetStatsRequest(model_name=MODEL))

    assert_rejected(results[middle], obj, bad)
    for photo, image_uuid, result in zip(photos, good, [*results[:middle], *results[middle + 1 :]], strict=True):
        assert_good(result, photo, image_uuid)
    sizes = Counter({b.batch_size: b.batches for b in after.batch_sizes})
    sizes.subtract({b.batch_size: b.batches for b in before.batch_sizes})
    assert +sizes == {len(uuids): 1}, f"batches formed during the test (size: count): {dict(+sizes)}"
    assert after.requests - before.requests == len(uuids)


# -- 7-9: bad uuids ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_uuid", "facts"),
    [
        pytest.param("", ("image_uuid is empty",), id="empty"),
        pytest.param("../x", ("'../x'", "not a canonical UUID"), id="dot-dot"),
        pytest.param("a/b", ("'a/b'", "not a canonical UUID"), id="slash"),
        pytest.param("/etc/passwd", ("'/etc/passwd'", "not a canonical UUID"), id="absolute-path"),
        pytest.param(
            "../" + str(uuid.UUID(int=1)), ("not a canonical UUID",), id="dot-dot-before-a-uuid"
        ),
        pytest.param(str(uuid.UUID(int=1)) + ".jpg", ("not a canonical UUID",), id="uuid-with-suffix"),
    ],
)
async def test_bad_uuid_is_invalid_argument(client: FlotillaClient, image_uuid: str, facts: tuple[str, ...]) -> None:
    with pytest.raises(FlotillaError) as caught:
        await client.classify(image_uuid, MODEL)
    assert caught.value.code == Code.INVALID_ARGUMENT, caught.value.message
    for fact in facts:
        assert fact in caught.value.message, (fact, caught.value.message)


async def test_10kb_uuid_gets_a_short_message(client: FlotillaClient) -> None:
    huge = "a" * 10_240
    with pytest.raises(FlotillaError) as caught:
        await client.classify(huge, MODEL)
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert len(caught.value.message) < 300, f"{len(caught.value.message)} chars: {caught.value.message[:400]}"
    assert "10240" in caught.value.message and "not a canonical UUID" in caught.value.message


# -- 10-12: routing headers ------------------------------------------------------------


async def test_unknown_model_is_not_found_listing_served_models(client: FlotillaClient) -> None:
    image_uuid = await client.upload(sample("coffee.jpg"))
    with pytest.raises(FlotillaError) as caught:
        await client.classify(image_uuid, "resnet-9000")
    assert caught.value.code == Code.NOT_FOUND
    assert "resnet-9000" in caught.value.message and MODEL in caught.value.message


async def test_unknown_model_with_a_4kb_name_gets_a_short_message(raw: grpc.aio.UnaryUnaryMultiCallable) -> None:
    """Beyond the issue's matrix: the 10 KB uuid rule, applied to the other caller-chosen name."""
    long_name = "m" * 4_000  # fits in gRPC's default 8 KiB of request headers
    error = await raw_error(
        raw, valid_body(), metadata=[("x-model-name", long_name), ("authorization", f"Bearer {API_KEY}")]
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    details = error.details() or ""
    assert MODEL in details  # still lists what is served
    assert len(details) < 300, f"{len(details)} chars: {details[:120]}..."


async def test_missing_model_header_is_invalid_argument(raw: grpc.aio.UnaryUnaryMultiCallable) -> None:
    error = await raw_error(raw, valid_body(), metadata=[("authorization", f"Bearer {API_KEY}")])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-model-name" in (error.details() or "")


@pytest.mark.parametrize(
    ("authorization", "fact"),
    [
        pytest.param(None, "missing authorization header", id="no-header"),
        pytest.param("Bearer not-the-key", "API key is not valid", id="wrong-key"),
        pytest.param(f"Basic {API_KEY}", "Bearer", id="not-bearer"),
        pytest.param(API_KEY, "Bearer", id="bare-key"),
    ],
)
async def test_bad_credentials_are_unauthenticated(
    raw: grpc.aio.UnaryUnaryMultiCallable, authorization: str | None, fact: str
) -> None:
    metadata = [("x-model-name", MODEL)]
    if authorization is not None:
        metadata.append(("authorization", authorization))
    error = await raw_error(raw, valid_body(), metadata=metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fact in (error.details() or "")


async def test_wrong_api_key_through_the_client_is_unauthenticated(stack: LocalStack) -> None:
    assert stack.state is not None and stack.settings is not None
    async with FlotillaClient(stack.state.router, "not-the-key", stack.settings.s3) as wrong:
        image_uuid = await wrong.upload(sample("coffee.jpg"))
        with pytest.raises(FlotillaError) as caught:
            await wrong.classify(image_uuid, MODEL)
    assert caught.value.code == Code.UNAUTHENTICATED
    assert "API key" in caught.value.message


# -- 13: deadlines -----------------------------------------------------------------


async def test_deadline_already_past_through_the_client(client: FlotillaClient) -> None:
    image_uuid = await client.upload(sample("coffee.jpg"))
    with pytest.raises(FlotillaError) as caught:
        await client.classify(image_uuid, MODEL, timeout_s=1e-6)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    assert "deadline" in caught.value.message.lower()


async def test_deadline_already_past_on_a_raw_call(raw: grpc.aio.UnaryUnaryMultiCallable) -> None:
    error = await raw_error(
        raw,
        valid_body(),
        metadata=[("x-model-name", MODEL), ("authorization", f"Bearer {API_KEY}")],
        timeout=0.000001,
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_deadline_shorter_than_the_queue_delay(client: FlotillaClient) -> None:
    """The deadline passes inside the mesh (the batcher holds a lone request 20 ms)."""
    image_uuid = await client.upload(sample("coffee.jpg"))
    with pytest.raises(FlotillaError) as caught:
        await client.classify(image_uuid, MODEL, timeout_s=0.005)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    assert "deadline" in caught.value.message.lower()
    # The mesh has forgotten it: the next request is answered normally.
    assert_good(await client.classify(image_uuid, MODEL, timeout_s=30), "coffee.jpg", image_uuid)


async def test_deadline_passing_in_flight_logs_no_error(
    stack: LocalStack,
    client: FlotillaClient,
    raw: grpc.aio.UnaryUnaryMultiCallable,
    admin: batcher_pb2_grpc.BatcherAdminStub,
) -> None:
    """An expired deadline is routine: the caller gets DEADLINE_EXCEEDED and no tier logs an error.

    Each tier's handler wakes up (with the batcher's DEADLINE_EXCEEDED, or the
    queue's own deadline timer) at the very moment gRPC ends the call for the
    same deadline, so whether it sends its status before or after the call is
    over is a race. Requests that all expire in a held queue run that race
    thousands of times: while the bug is there, the router or the batcher logs
    "ExecuteBatchError raised in core" within about 5 rounds on average (at
    most 20 in 27 tries).
    """
    offsets = {p.name: p.log_path.stat().st_size for p in stack.flotilla_services()}
    image_uuid = await client.upload(sample("coffee.jpg"))
    policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
    policy.max_batch_size = 64
    policy.max_queue_delay_us = HOLD_DELAY_US  # every request expires while queued
    await admin.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy))
    metadata = [("x-model-name", MODEL), ("authorization", f"Bearer {API_KEY}")]

    async def expire(timeout_s: float) -> grpc.StatusCode | None:
        try:
            await raw(valid_body(image_uuid), metadata=metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return None

    def logged_errors() -> list[str]:
        return [
            f"{p.name}: {record}"
            for p in stack.flotilla_services()
            for record in traceback_records(log_since(p.log_path, offsets[p.name]))
        ]

    errors: list[str] = []
    for _ in range(RACE_ROUNDS):
        codes = await asyncio.gather(*(expire(0.02 + 0.001 * (i % 40)) for i in range(200)))
        assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}, Counter(codes)
        errors = logged_errors()
        if errors:
            break
    assert not errors, f"{len(errors)} error records, the first:\n{errors[0]}"


# -- 14: a body that is not a protobuf message ------------------------------------------


async def test_unparseable_body_is_invalid_argument_naming_the_message_type(
    raw: grpc.aio.UnaryUnaryMultiCallable,
) -> None:
    error = await raw_error(
        raw, NOT_PROTOBUF, metadata=[("x-model-name", MODEL), ("authorization", f"Bearer {API_KEY}")]
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert "flotilla.api.v1.ClassifyRequest" in details
    assert str(len(NOT_PROTOBUF)) in details  # how much was received


# -- B: after the whole matrix (keep these last) -------------------------------------------


def test_no_bad_input_made_a_service_log_a_traceback(stack: LocalStack, log_offsets: dict[str, int]) -> None:
    """Rejections are answers, not crashes: no traceback in any service's log."""
    for proc in stack.flotilla_services():
        records = traceback_records(log_since(proc.log_path, log_offsets.get(proc.name, 0)))
        assert not records, f"{proc.name} logged {len(records)} tracebacks, the first:\n{records[0]}"


async def test_every_service_survives_the_matrix(stack: LocalStack, client: FlotillaClient) -> None:
    for proc in stack.flotilla_services():
        assert proc.alive(), proc.exit_summary()
        assert is_serving(proc.address), f"{proc.name} at {proc.address} is not SERVING"
    for proc in stack.processes():  # SeaweedFS and Triton too
        assert proc.alive(), proc.exit_summary()
    # And the mesh still classifies.
    image_uuid = await client.upload(sample("chelsea.jpg"))
    assert_good(await client.classify(image_uuid, MODEL, timeout_s=30), "chelsea.jpg", image_uuid)
