"""KServe v2 bytes on the wire, read without a protobuf or JSON parser (no grpc here).

``model_from_wire`` lets the gRPC layer check the key and the route of a ModelInferRequest before it
parses the body; ``decode_bytes_tensor``/``encode_bytes_tensor`` are the binary form of a BYTES tensor
(``raw_input_contents``/``raw_output_contents`` in gRPC, binary tensor data over HTTP): each element a
4-byte little-endian length, then its bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from flotilla.errors import InvalidArgument, MalformedRequest
from flotilla.services.router.kserve.protocol import UUID_INPUT

_LENGTH = struct.Struct("<I")
_MAX_VARINT_BYTES = 10
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def model_from_wire(raw: bytes) -> str:
    """The ``model_name`` (field 1) of a serialised ModelInferRequest, "" when it has none, without parsing
    the message: the top-level fields are walked and skipped by their lengths (the last field 1 wins, as
    in a parse). Bytes that are not a message raise ``MalformedRequest``."""
    view = memoryview(raw)
    end = len(view)
    pos = 0
    name = ""
    while pos < end:
        key, pos = _varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise MalformedRequest(f"request body is not a ModelInferRequest: field number 0 at byte {pos}")
        if wire_type == _WIRE_VARINT:
            _, pos = _varint(view, pos)
        elif wire_type == _WIRE_I64:
            pos += 8
        elif wire_type == _WIRE_I32:
            pos += 4
        elif wire_type == _WIRE_LEN:
            length, pos = _varint(view, pos)
            if pos + length > end:
                raise MalformedRequest(f"request body is not a ModelInferRequest: truncated ({end} bytes)")
            if number == 1:
                try:
                    name = bytes(view[pos:pos + length]).decode("utf-8")
                except UnicodeDecodeError:
                    raise MalformedRequest("request body's model_name is not UTF-8") from None
            pos += length
        else:
            raise MalformedRequest(f"request body is not a ModelInferRequest: wire type {wire_type} at byte {pos}")
        if number == 1 and wire_type != _WIRE_LEN:
            raise MalformedRequest("request body is not a ModelInferRequest: model_name is not a string")
    if pos > end:
        raise MalformedRequest(f"request body is not a ModelInferRequest: truncated ({end} bytes)")
    return name


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 7 * _MAX_VARINT_BYTES, 7):
        if pos >= len(view):
            raise MalformedRequest(f"request body is not a ModelInferRequest: truncated ({len(view)} bytes)")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise MalformedRequest(f"request body is not a ModelInferRequest: varint over {_MAX_VARINT_BYTES} bytes")


def decode_bytes_tensor(raw: bytes | memoryview, name: str = UUID_INPUT) -> list[bytes]:
    """The elements of a BYTES tensor in its binary form: each a 4-byte little-endian length, then its bytes."""
    view = memoryview(raw)
    values = []
    pos = 0
    while pos < len(view):
        if pos + _LENGTH.size > len(view):
            raise InvalidArgument(f"input {name}: binary BYTES data is truncated at byte {pos} (a length prefix)")
        (length,) = _LENGTH.unpack_from(view, pos)
        pos += _LENGTH.size
        if pos + length > len(view):
            raise InvalidArgument(f"input {name}: binary BYTES data is truncated at byte {pos} ({length}-byte element)")
        values.append(bytes(view[pos:pos + length]))
        pos += length
    return values


def encode_bytes_tensor(values: Sequence[bytes]) -> bytes:
    """``values`` as a BYTES tensor's binary form (``decode_bytes_tensor``'s inverse)."""
    return b"".join(_LENGTH.pack(len(v)) + v for v in values)
