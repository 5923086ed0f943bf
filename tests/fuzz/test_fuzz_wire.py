"""Fuzz: the parsers of small untrusted values: a model name read off a KServe request's wire, a BYTES
tensor's binary form, image uuids, the authorization header and the binary-data header's length.

Each answers with a value or one of its documented errors (a ``FlotillaError`` with its status), never
anything else, in time bounded by its input.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st

from flotilla.api.kserve import grpc_service_pb2 as kserve_pb2
from flotilla.common.ids import check_image_uuid
from flotilla.errors import Code, InvalidArgument, InvalidImageUuid, MalformedRequest, Unauthenticated
from flotilla.services.router.kserve.http_json import header_length
from flotilla.services.router.kserve.wire import decode_bytes_tensor, encode_bytes_tensor, model_from_wire
from flotilla.services.router.routing import ApiKeys
from tests.fuzz.strategies import header_text, uuid_like

KEY = "fuzz-key"


def protobuf_fields(draw: st.DrawFn) -> bytes:
    """Fields of a protobuf message, some of them field 1 (ModelInferRequest's model_name), some garbage."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        number = draw(st.sampled_from([1, 1, 2, 3, 4, 5, 6, 7, 8, 99, 536870911]))
        wire = draw(st.sampled_from([0, 1, 2, 2, 3, 4, 5, 6, 7]))
        out += encode_varint(number << 3 | wire)
        if wire == 0:
            out += encode_varint(draw(st.integers(0, 2**64 - 1)))
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        elif wire == 2:
            payload = draw(st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=40)))
            length = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**35)))
            out += encode_varint(length) + payload
    return bytes(out) + draw(st.binary(max_size=4))


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


wire_bytes = st.one_of(st.binary(max_size=200), st.composite(protobuf_fields)())


@given(wire_bytes)
@example(b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01")  # a length varint of ten bytes
@example(b"\x08" + b"\xff" * 11)  # a varint over ten bytes
@example(b"\x0a\x02\xff\xfe")  # model_name not UTF-8
def test_model_from_wire_answers_a_name_or_malformed_and_agrees_with_protobuf(raw: bytes) -> None:
    try:
        name = model_from_wire(raw)
    except MalformedRequest as exc:
        assert exc.code == Code.INVALID_ARGUMENT
        name = None
    assert name is None or isinstance(name, str)
    try:
        parsed = kserve_pb2.ModelInferRequest.FromString(raw)
    except DecodeError:
        return
    # Every message protobuf reads, the scan reads the same name from (groups aside: not in this proto).
    if name is not None:
        assert name == parsed.model_name


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_bytes_tensor_round_trips(values: list[bytes]) -> None:
    assert decode_bytes_tensor(encode_bytes_tensor(values)) == values


@given(st.binary(max_size=300))
@example(b"\xff\xff\xff\xff")  # an element declaring 4 GiB
@example(b"\x00\x00\x00")  # a cut length prefix
def test_bytes_tensor_decode_answers_elements_or_invalid_argument(raw: bytes) -> None:
    try:
        values = decode_bytes_tensor(raw)
    except InvalidArgument as exc:
        assert exc.code == Code.INVALID_ARGUMENT
        return
    assert sum(4 + len(v) for v in values) == len(raw)


@given(uuid_like)
@example("../../etc/passwd")
@example("123e4567-e89b-12d3-a456-4266141740000")  # 37 characters
@example("123e4567-e89b-12d3-a456-42661417400\n")  # a newline where a digit goes
@example("0" * 18 + "\x1f" * 3 + "\U000107bb" * 8)  # found: a message of 200 characters (the test's bound was tight)
def test_check_image_uuid_answers_the_canonical_form_or_invalid_image_uuid(value: str) -> None:
    try:
        canonical = check_image_uuid(value)
    except InvalidImageUuid as exc:
        assert exc.code == Code.INVALID_ARGUMENT
        # The message repeats a bounded part of what it was sent (40 characters, each at most 10 as
        # repr shows them): it travels in a header, which a client limits (gRPC's 8 KiB).
        assert len(exc.message) < 600
        return
    assert canonical == value.lower() and len(canonical) == 36
    assert set(canonical) <= set("0123456789abcdef-")


@given(st.one_of(st.none(), header_text, header_text.map(lambda v: "Bearer " + v), st.just(f"bEaReR  {KEY} ")))
@example(f"Bearer {KEY}")
def test_api_keys_answer_only_unauthenticated(authorization: str | None) -> None:
    keys = ApiKeys([KEY])
    try:
        keys.check(authorization)
    except Unauthenticated as exc:
        assert exc.code == Code.UNAUTHENTICATED
        assert KEY not in exc.message
        return
    assert authorization is not None and authorization[len("bearer "):].strip() == KEY


@given(st.one_of(header_text, st.integers(-(10**30), 10**30).map(str)))
@example("9" * 5000)  # past int()'s digit limit
def test_binary_header_length_is_a_number_or_malformed(value: str) -> None:
    try:
        length = header_length({"inference-header-content-length": value})
    except MalformedRequest:
        return
    assert isinstance(length, int)
