"""The router's KServe v2 core: checks, the fan-out of a request's images, the answer's tensors, the
descriptions, and the bytes read off the wire, against a fake forwarder and fleet."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from flotilla.api.kserve import grpc_service_pb2 as kserve_pb2
from flotilla.api.v1 import controller_pb2, inference_pb2
from flotilla.config import BatchingSettings, ModelSettings
from flotilla.errors import (
    Code,
    FlotillaError,
    ImageNotFound,
    InvalidArgument,
    MalformedRequest,
    ModelNotFound,
    NotFound,
    QueueFull,
)
from flotilla.services.router.forward import TimeRemaining, no_deadline
from flotilla.services.router.kserve.core import KServeFront
from flotilla.services.router.kserve.protocol import (
    InferRequest,
    InputTensor,
    RequestedOutput,
)
from flotilla.services.router.kserve.wire import decode_bytes_tensor, encode_bytes_tensor, model_from_wire

MODEL = "classifier"
LABELS = ["cat", "dog", "fox", "owl"]
UUIDS = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(6)]


def scores_for(uuid: str) -> list[float]:
    """A distinct, ordered probability row per image: the image's last digit's class is best."""
    best = int(uuid[-1]) % len(LABELS)
    row = [0.1, 0.1, 0.1, 0.1]
    row[best] = 0.7
    return row


class FakeRouter:
    """Routes ``routed`` models; answers each image from its uuid, fails those in ``failures``, and holds
    the calls of ``held`` uuids until ``release`` is set (or they are cancelled)."""

    def __init__(self, routed: Sequence[str] = (MODEL,)) -> None:
        self.routed = set(routed)
        self.failures: dict[str, FlotillaError] = {}
        self.held: set[str] = set()
        self.release = asyncio.Event()
        self.requests: list[inference_pb2.ClassifyRequest] = []
        self.cancelled: list[str] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.all_arrived = asyncio.Event()
        self.expected = 0

    def check_model(self, model: str | None) -> None:
        if not model:
            raise InvalidArgument("no model")
        if model not in self.routed:
            raise ModelNotFound(f"model {model!r} is not served")

    async def call(
        self, model: str | None, raw: bytes, headers: Sequence[tuple[str, str]], time_remaining: TimeRemaining
    ) -> bytes:
        self.check_model(model)
        request = inference_pb2.ClassifyRequest.FromString(raw)
        self.requests.append(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if len(self.requests) >= self.expected:
            self.all_arrived.set()
        try:
            await self.all_arrived.wait()
            if request.image_uuid in self.held:
                await self.release.wait()
            failure = self.failures.get(request.image_uuid)
            if failure is not None:
                raise failure
        except asyncio.CancelledError:
            self.cancelled.append(request.image_uuid)
            raise
        finally:
            self.in_flight -= 1
        k = request.top_k or 5
        row = scores_for(request.image_uuid)
        best = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        return inference_pb2.ClassifyResponse(
            image_uuid=request.image_uuid, model_name=request.model_name, request_id=request.request_id,
            classes=[inference_pb2.ClassScore(index=i, label=LABELS[i], score=row[i]) for i in best],
            scores=row if request.all_scores else [],
        ).SerializeToString()


class FakeFleet:
    def __init__(self, **specs: ModelSettings) -> None:
        self.models = {
            name: controller_pb2.ModelStatus(name=name, spec_json=spec.model_dump_json(), batchers=["b:1"])
            for name, spec in specs.items()
        }


def spec(**changes: object) -> ModelSettings:
    values: dict[str, object] = {"labels": LABELS, "versions": [1, 2], "default_version": 2}
    values.update(changes)
    return ModelSettings.model_validate(values)


def front(router: FakeRouter | None = None, fleet: FakeFleet | None = None) -> tuple[KServeFront, FakeRouter]:
    router = router or FakeRouter()
    return KServeFront(router, fleet or FakeFleet(**{MODEL: spec()}), ready=lambda: True), router


def request(
    uuids: Sequence[str] = UUIDS[:1],
    *,
    shape: Sequence[int] | None = None,
    name: str = "IMAGE_UUID",
    datatype: str = "BYTES",
    model: str = MODEL,
    version: str = "",
    outputs: Sequence[RequestedOutput] = (),
    parameters: dict[str, bool | int | float | str] | None = None,
) -> InferRequest:
    values = [u.encode() for u in uuids]
    tensor = InputTensor(name, datatype, list(shape) if shape is not None else [len(values)], values)
    return InferRequest(model, [tensor], version, "req-1", outputs, parameters or {})


async def infer(kserve: KServeFront, req: InferRequest) -> dict[str, tuple[str, tuple[int, ...], object]]:
    result = await kserve.infer(req, [("x-trace", "1")], no_deadline)
    return {o.name: (o.datatype, o.shape, o.data) for o in result.outputs}


# --- one request of N images ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[4], [4, 1]])
async def test_n_images_become_n_concurrent_classify_calls_and_one_answer_in_order(shape: list[int]) -> None:
    kserve, router = front()
    router.expected = 4
    outputs = await infer(kserve, request(UUIDS[:4], shape=shape))
    assert [r.image_uuid for r in router.requests] == UUIDS[:4]
    assert router.most_in_flight == 4  # each call waited until all four had arrived
    assert all(r.all_scores and r.model_name == MODEL and r.model_version == 0 for r in router.requests)
    datatype, out_shape, scores = outputs["PROBABILITIES"]
    assert (datatype, out_shape) == ("FP32", (4, 4))
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, [scores_for(u) for u in UUIDS[:4]])
    datatype, out_shape, labels = outputs["LABELS"]
    assert (datatype, out_shape) == ("BYTES", (4, 4))  # top_k 5 of 4 classes: all 4, best first
    assert isinstance(labels, list)
    assert labels[0::4] == [LABELS[int(u[-1]) % 4].encode() for u in UUIDS[:4]]


async def test_top_k_sets_the_labels_per_image_and_the_request_id_of_each_image() -> None:
    kserve, router = front()
    router.expected = 2
    result = await kserve.infer(request(UUIDS[1:3], parameters={"top_k": 2}), [], no_deadline)
    assert [r.request_id for r in router.requests] == ["req-1[0]", "req-1[1]"]
    assert result.id == "req-1" and result.model == MODEL and result.version == "2"
    labels = next(o for o in result.outputs if o.name == "LABELS")
    assert labels.shape == (2, 2)
    assert labels.data[0] == b"dog" and labels.data[2] == b"fox"


async def test_only_the_requested_outputs_come_back_and_scores_are_not_asked_when_not_wanted() -> None:
    kserve, router = front()
    router.expected = 1
    outputs = await infer(kserve, request(outputs=[RequestedOutput("LABELS")]))
    assert list(outputs) == ["LABELS"]
    assert not router.requests[0].all_scores


async def test_classification_output_is_triton_score_index_label_strings() -> None:
    kserve, router = front()
    router.expected = 2
    outputs = await infer(
        kserve, request(UUIDS[1:3], outputs=[RequestedOutput("PROBABILITIES", classification=2)],
                        parameters={"top_k": 1}),
    )
    datatype, shape, data = outputs["PROBABILITIES"]
    assert (datatype, shape) == ("BYTES", (2, 2))
    assert data == [b"0.700000:1:dog", b"0.100000:0:cat", b"0.700000:2:fox", b"0.100000:0:cat"]
    assert router.requests[0].top_k == 2  # enough classes for the widest output asked
    assert not router.requests[0].all_scores


async def test_version_priority_and_timeout_travel_with_each_image() -> None:
    kserve, router = front()
    router.expected = 1
    result = await kserve.infer(request(version="1", parameters={"priority": 2, "timeout": 5000}), [], no_deadline)
    sent = router.requests[0]
    assert (sent.model_version, sent.priority, sent.timeout_us) == (1, 2, 5000)
    assert result.version == "1"


async def test_one_failed_image_fails_the_request_naming_it_and_cancels_the_others() -> None:
    kserve, router = front()
    router.expected = 4
    router.held = {UUIDS[0], UUIDS[1], UUIDS[3]}
    router.failures[UUIDS[2]] = QueueFull("queue of 'classifier' is full")
    with pytest.raises(QueueFull) as info:
        await infer(kserve, request(UUIDS[:4]))
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert info.value.message.startswith(f"IMAGE_UUID[2] {UUIDS[2]}: queue of")
    assert sorted(router.cancelled) == sorted([UUIDS[0], UUIDS[1], UUIDS[3]])
    assert router.in_flight == 0


async def test_an_image_the_store_lacks_is_invalid_argument_naming_it() -> None:
    kserve, router = front()
    router.expected = 2
    router.failures[UUIDS[1]] = ImageNotFound("no object in bucket", origin="object store s3:8333")
    with pytest.raises(InvalidArgument, match=rf"IMAGE_UUID\[1\] {UUIDS[1]}: no object") as info:
        await infer(kserve, request(UUIDS[:2]))
    assert info.value.code == Code.INVALID_ARGUMENT and info.value.origin == "object store s3:8333"


async def test_one_image_failing_is_named_too() -> None:
    kserve, router = front()
    router.expected = 1
    router.failures[UUIDS[0]] = NotFound("model moved")  # the batcher's own NOT_FOUND (no origin) stays one
    with pytest.raises(NotFound, match=rf"IMAGE_UUID\[0\] {UUIDS[0]}: model moved") as info:
        await infer(kserve, request())
    assert info.value.code == Code.NOT_FOUND


async def test_a_cancelled_request_cancels_every_image_call() -> None:
    kserve, router = front()
    router.expected = 3
    router.held = set(UUIDS[:3])
    task = asyncio.ensure_future(infer(kserve, request(UUIDS[:3])))
    await router.all_arrived.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(router.cancelled) == UUIDS[:3]


# --- what a request may say ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request(name="INPUT0"), "unexpected inference input 'INPUT0'"),
        (request(datatype="INT64"), "data-type is 'INT64'"),
        (request(UUIDS[:2], shape=[2, 2]), r"shape \[2, 2\]"),
        (request(UUIDS[:2], shape=[3]), r"shape \[3\] but 2 elements"),
        (request([], shape=[0]), r"N >= 1"),
        (request(UUIDS[:1], shape=[1, 1, 1]), r"\[N\] or \[N,1\]"),
        (request([UUIDS[0], "not-a-uuid"]), r"IMAGE_UUID\[1\]: image_uuid 'not-a-uuid'"),
        (request(outputs=[RequestedOutput("OUTPUT0")]), "unexpected inference output 'OUTPUT0'"),
        (request(outputs=[RequestedOutput("LABELS", classification=2)]), "classification applies to PROBABILITIES"),
        (request(parameters={"top_k": "3"}), "'top_k' must be an integer from 0 to 4294967295"),
        (request(parameters={"top_k": True}), "'top_k' must be an integer from 0 to 4294967295"),
        (request(parameters={"priority": -1}), "'priority' must be an integer from 0"),
        (request(parameters={"timeout": 2**40}), "'timeout' must be an integer from 0"),
        (request(outputs=[RequestedOutput("PROBABILITIES", classification=2**40)]), "classification must be from 0"),
        (request(version="one"), "version 'one' is not a positive number"),
        (request(model=""), "no model named"),
    ],
)
async def test_a_bad_request_is_invalid_argument_before_any_call(req: InferRequest, message: str) -> None:
    kserve, router = front()
    with pytest.raises(InvalidArgument, match=message) as info:
        await kserve.infer(req, [], no_deadline)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert router.requests == []


async def test_two_inputs_are_invalid_argument() -> None:
    kserve, _ = front()
    req = request()
    two = InferRequest(MODEL, [*req.inputs, *req.inputs], "", "", (), {})
    with pytest.raises(InvalidArgument, match="expects one input IMAGE_UUID"):
        await kserve.infer(two, [], no_deadline)


async def test_a_uuid_that_is_not_utf8_is_invalid_argument_naming_its_place() -> None:
    kserve, _ = front()
    bad = InferRequest(MODEL, [InputTensor("IMAGE_UUID", "BYTES", [2], [UUIDS[0].encode(), b"\xff\xfe"])])
    with pytest.raises(InvalidArgument, match=r"IMAGE_UUID\[1\] is not UTF-8"):
        await kserve.infer(bad, [], no_deadline)


async def test_more_images_than_the_queue_holds_is_invalid_argument() -> None:
    kserve, router = front(fleet=FakeFleet(**{MODEL: spec(batching=BatchingSettings(max_queue_size=3))}))
    with pytest.raises(InvalidArgument, match="queues at most 3"):
        await kserve.infer(request(UUIDS[:4]), [], no_deadline)
    assert router.requests == []


async def test_an_upper_case_uuid_is_sent_canonical() -> None:
    kserve, router = front()
    router.expected = 1
    await kserve.infer(request([UUIDS[3].upper()]), [], no_deadline)
    assert router.requests[0].image_uuid == UUIDS[3]


async def test_unknown_model_is_not_found_and_unknown_version_too() -> None:
    kserve, router = front()
    with pytest.raises(ModelNotFound, match="'other' is not served"):
        await kserve.infer(request(model="other"), [], no_deadline)
    with pytest.raises(NotFound, match=r"has no version 7; live versions: \[1, 2\]") as info:
        await kserve.infer(request(version="7"), [], no_deadline)
    assert info.value.code == Code.NOT_FOUND
    assert router.requests == []


# --- descriptions -------------------------------------------------------------------------------------


def test_model_metadata_states_the_uuid_input_and_both_outputs() -> None:
    kserve, _ = front()
    metadata = kserve.model_metadata(MODEL)
    assert metadata.versions == ["1", "2"]
    assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [("IMAGE_UUID", "BYTES", (-1, 1))]
    assert [(t.name, t.datatype, t.shape) for t in metadata.outputs] == [
        ("PROBABILITIES", "FP32", (-1, 4)), ("LABELS", "BYTES", (-1, -1)),
    ]
    with pytest.raises(ModelNotFound):
        kserve.model_metadata("other")
    with pytest.raises(NotFound):
        kserve.model_metadata(MODEL, "3")


def test_model_config_states_the_batching_policy() -> None:
    batching = BatchingSettings(max_batch_size=4, preferred_batch_sizes=[2, 4], max_queue_delay_us=700,
                                max_queue_size=99, priority_levels=2, default_timeout_us=5, timeout_action="DELAY")
    kserve, _ = front(fleet=FakeFleet(**{MODEL: spec(batching=batching)}))
    config = kserve.model_config(MODEL).triton_json()
    assert config["max_batch_size"] == 4
    assert config["input"] == [{"name": "IMAGE_UUID", "data_type": "TYPE_STRING", "dims": [1]}]
    assert config["output"][0] == {"name": "PROBABILITIES", "data_type": "TYPE_FP32", "dims": [4]}
    dynamic = config["dynamic_batching"]
    assert dynamic["preferred_batch_size"] == [2, 4] and dynamic["max_queue_delay_microseconds"] == 700
    assert dynamic["priority_levels"] == 2
    assert dynamic["default_queue_policy"] == {
        "timeout_action": "DELAY", "default_timeout_microseconds": 5, "allow_timeout_override": True,
        "max_queue_size": 99,
    }


def test_a_registered_routed_model_is_ready_even_with_no_copy() -> None:
    fleet = FakeFleet(**{MODEL: spec(min_copies=0), "unrouted": spec()})
    assert not fleet.models[MODEL].copies
    kserve, _ = front(fleet=fleet)
    assert kserve.model_ready(MODEL) and kserve.model_ready(MODEL, "1")
    assert not kserve.model_ready(MODEL, "3")
    assert not kserve.model_ready("unrouted")
    assert not kserve.model_ready("other")


def test_a_changed_spec_is_read_again() -> None:
    fleet = FakeFleet(**{MODEL: spec()})
    kserve, _ = front(fleet=fleet)
    assert kserve.model_metadata(MODEL).versions == ["1", "2"]
    fleet.models[MODEL] = controller_pb2.ModelStatus(name=MODEL, spec_json=spec(versions=[3], default_version=0).model_dump_json())
    assert kserve.model_metadata(MODEL).versions == ["3"]


def test_server_is_live_and_ready_as_the_router_says() -> None:
    ready = [False]
    kserve = KServeFront(FakeRouter(), FakeFleet(), ready=lambda: ready[0])
    assert kserve.live() and not kserve.ready()
    ready[0] = True
    assert kserve.ready()
    assert kserve.server_metadata().name == "flotilla"
    assert "classification" in kserve.server_metadata().extensions


# --- the wire -----------------------------------------------------------------------------------------


def test_model_name_is_read_off_the_wire_past_large_fields() -> None:
    message = kserve_pb2.ModelInferRequest(model_name="resnet", model_version="2", id="x")
    message.raw_input_contents.append(b"\x00" * 300_000)
    message.parameters["top_k"].int64_param = 3
    message.inputs.add(name="IMAGE_UUID", datatype="BYTES", shape=[1])
    assert model_from_wire(message.SerializeToString()) == "resnet"
    # Field order on the wire is free, and the last model_name wins, as in a parse.
    tail = kserve_pb2.ModelInferRequest(model_name="later").SerializeToString()
    raw = message.SerializeToString() + tail
    assert model_from_wire(raw) == kserve_pb2.ModelInferRequest.FromString(raw).model_name == "later"
    assert model_from_wire(kserve_pb2.ModelInferRequest(id="x").SerializeToString()) == ""
    assert model_from_wire(b"") == ""


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\x05abc",  # model_name's length runs past the end
        b"\x0a",  # a length that never comes
        b"\x08\x01",  # field 1 as a varint
        b"\x00\x01",  # field number 0
        b"\x0b",  # a group (wire type 3)
        b"\x0f",  # wire type 7
        b"\x1a\x01x\x0a\x02\xff\xfe",  # model_name not UTF-8
        b"\x10" + b"\xff" * 11,  # a varint of more than 10 bytes
        b"\x11\x00\x00",  # a fixed64 cut short
    ],
)
def test_bytes_that_are_not_a_request_are_malformed_not_a_crash(raw: bytes) -> None:
    with pytest.raises(MalformedRequest) as info:
        model_from_wire(raw)
    assert info.value.code == Code.INVALID_ARGUMENT


def test_garbage_never_crashes_the_scan_and_agrees_with_a_parse() -> None:
    rng = random.Random(7)
    valid = kserve_pb2.ModelInferRequest(model_name="m", id="abc", raw_input_contents=[b"xyz"]).SerializeToString()
    for _ in range(3000):
        if rng.random() < 0.5:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        else:  # a valid message with a few bytes changed or cut
            mutated = bytearray(valid)
            for _ in range(rng.randrange(1, 3)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            raw = bytes(mutated[: rng.randrange(len(mutated) + 1)])
        try:
            name = model_from_wire(raw)
        except MalformedRequest:
            continue
        try:
            parsed = kserve_pb2.ModelInferRequest.FromString(raw)
        except DecodeError:
            continue  # the scan reads top-level fields only; the full parse looks inside them
        assert name == parsed.model_name


def test_bytes_tensor_round_trips_and_a_truncated_one_is_invalid_argument() -> None:
    values = [b"", b"a", "é".encode(), b"x" * 300]
    raw = encode_bytes_tensor(values)
    assert decode_bytes_tensor(raw) == values
    assert decode_bytes_tensor(b"") == []
    with pytest.raises(InvalidArgument, match="truncated"):
        decode_bytes_tensor(raw[:-1])
    with pytest.raises(InvalidArgument, match="truncated"):
        decode_bytes_tensor(b"\x01\x00")
