"""The KServe v2 REST infer body: JSON (and the binary tensor data extension) to and from ``protocol``'s objects.

No transport here: ``http`` hands in the body and the ``Inference-Header-Content-Length`` header and
sends what comes back.

**JSON** (the protocol): a request is ``{"id", "parameters", "inputs": [{"name", "datatype", "shape",
"data"}], "outputs": [{"name", "parameters"}]}``, ``data`` row-major, flat or nested; BYTES elements
are strings. An answer's ``data`` is flat, row-major; BYTES elements are strings (UTF-8).

**Binary tensor data** (Triton's extension, what tritonclient.http sends and asks for by default):
the body is the JSON header (``Inference-Header-Content-Length`` bytes) followed by the tensors' bytes.
An input whose ``parameters`` have ``binary_data_size`` takes that many bytes from there, in the order
of the inputs (BYTES: each element a 4-byte little-endian length, then its bytes). An output asked
with ``binary_data: true`` (or any output, when the request names none and sets
``binary_data_output``) is answered the same way: the header's output gets ``binary_data_size``
instead of ``data``, its bytes follow the JSON (FP32 little-endian), and the answer's header length
is returned for the ``Inference-Header-Content-Length`` response header.

The mesh takes BYTES inputs only; an input of another datatype is carried with no values (the core
refuses it by its datatype, naming it). Malformed bodies raise ``MalformedRequest`` (400).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flotilla.common.ids import shorten
from flotilla.errors import BackendError, MalformedRequest
from flotilla.services.router.kserve.protocol import (
    BYTES,
    CLASSIFICATION_PARAMETER,
    InferRequest,
    InferResult,
    InputTensor,
    ParameterValue,
    RequestedOutput,
)
from flotilla.services.router.kserve.wire import decode_bytes_tensor, encode_bytes_tensor

BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
"""On a requested output: answer it as binary tensor data."""
BINARY_DATA_OUTPUT = "binary_data_output"
"""A request parameter: every output as binary tensor data (tritonclient sets it when it names no outputs)."""
MAX_DIMS = 8


@dataclass(frozen=True)
class DecodedInfer:
    """An infer body, decoded: the request, and which of its outputs go back as binary data."""

    request: InferRequest
    binary_outputs: frozenset[str]
    all_binary: bool
    """The request named no outputs and set ``binary_data_output``."""

    def binary(self, output: str) -> bool:
        return self.all_binary or output in self.binary_outputs


def decode_infer(model: str, version: str, body: bytes, header_length: int | None) -> DecodedInfer:
    """The infer request in ``body`` for ``model`` (``version``: "" for the default); ``header_length``:
    the ``Inference-Header-Content-Length`` header (None: all of the body is JSON)."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if not 0 <= header_length <= len(body):
            raise MalformedRequest(
                f"Inference-Header-Content-Length is {header_length}, but the body has {len(body)} bytes"
            )
        header, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        document = json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"request body is not JSON: {shorten(str(exc))}") from None
    except RecursionError:  # found by fuzzing: a few thousand nested arrays were a 500
        raise MalformedRequest("request body is JSON nested too deeply") from None
    if not isinstance(document, dict):
        raise MalformedRequest("request body must be a JSON object with \"inputs\"")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise MalformedRequest("\"id\" must be a string")
    parameters = _parameters(document.get("parameters"), "the request's \"parameters\"")
    inputs_json = document.get("inputs")
    if not isinstance(inputs_json, list):
        raise MalformedRequest("request body needs \"inputs\": a list of tensors")
    inputs = []
    offset = 0
    for i, tensor in enumerate(inputs_json):
        decoded, offset = _input(tensor, i, binary, offset)
        inputs.append(decoded)
    if offset != len(binary):
        raise MalformedRequest(
            f"the inputs' binary_data_size add up to {offset} bytes, but {len(binary)} follow the JSON header"
        )
    outputs, binary_outputs = _outputs(document.get("outputs", []))
    all_binary = not outputs and parameters.get(BINARY_DATA_OUTPUT) is True
    request = InferRequest(
        model=model, inputs=inputs, version=version, id=request_id, outputs=outputs, parameters=parameters
    )
    return DecodedInfer(request, frozenset(binary_outputs), all_binary)


def encode_result(result: InferResult, decoded: DecodedInfer) -> tuple[bytes, int | None]:
    """The answer's body and, when some output is binary, the length of its JSON header."""
    outputs_json: list[str] = []
    chunks: list[bytes] = []
    for output in result.outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        data = ""
        if decoded.binary(output.name):
            if isinstance(output.data, np.ndarray):
                raw = np.ascontiguousarray(output.data, dtype="<f4").tobytes()  # FP32, the only numeric output
            else:
                raw = encode_bytes_tensor(output.data)
            entry["parameters"] = {BINARY_DATA_SIZE: len(raw)}
            chunks.append(raw)
        elif isinstance(output.data, np.ndarray):
            data = _fp32_json(output.data)
        else:
            data = _dumps([value.decode("utf-8", "replace") for value in output.data])
        text = _dumps(entry)
        outputs_json.append(f'{text[:-1]},"data":{data}}}' if data else text)
    document: dict[str, Any] = {"model_name": result.model, "model_version": result.version}
    if result.id:
        document["id"] = result.id
    header = f'{_dumps(document)[:-1]},"outputs":[{",".join(outputs_json)}]}}'.encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _fp32_json(values: NDArray[np.float32]) -> str:
    """FP32 ``values`` as a flat JSON list, row-major. Nine significant digits give back the same FP32
    value, in half the characters and half the CPU of a float64's shortest form (``json.dumps``: about
    0.4 ms for one image's 1000 classes here)."""
    if not np.isfinite(values).all():  # NaN and infinity have no JSON form
        raise BackendError("the model answered a probability that is not a finite number")
    return "[" + ",".join([f"{x:.9g}" for x in values.ravel().tolist()]) + "]"


def _input(tensor: object, place: int, binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    where = f"inputs[{place}]"
    if not isinstance(tensor, dict):
        raise MalformedRequest(f"{where} must be a JSON object with name, datatype, shape and data")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise MalformedRequest(f"{where} needs a \"name\" and a \"datatype\" (strings)")
    where = f"input {shorten(name)!r}"
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise MalformedRequest(f"{where}: \"shape\" must be a list of at most {MAX_DIMS} non-negative integers")
    parameters = _parameters(tensor.get("parameters"), f"{where}'s \"parameters\"")
    size = parameters.get(BINARY_DATA_SIZE)
    values: list[bytes] = []
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise MalformedRequest(f"{where}: {BINARY_DATA_SIZE} must be a non-negative integer")
        if "data" in tensor:
            raise MalformedRequest(f"{where} has both \"data\" and {BINARY_DATA_SIZE}")
        if offset + size > len(binary):
            raise MalformedRequest(
                f"{where}: {BINARY_DATA_SIZE} {size} runs past the end of the body's binary data"
            )
        if datatype == BYTES:
            values = decode_bytes_tensor(binary[offset:offset + size], name)
        offset += size
    else:
        if "data" not in tensor:
            raise MalformedRequest(f"{where} has no \"data\" (nor {BINARY_DATA_SIZE} in its parameters)")
        if datatype == BYTES:
            for value in _flat(tensor["data"], where):
                if not isinstance(value, str):
                    raise MalformedRequest(f"{where} is {BYTES}: its data must be strings, got {shorten(repr(value))}")
                try:
                    values.append(value.encode("utf-8"))
                except UnicodeEncodeError:  # found by fuzzing: "\ud800" is valid JSON, no UTF-8 (a 500)
                    raise MalformedRequest(f"{where}: {shorten(repr(value))} is not Unicode text") from None
    return InputTensor(name=name, datatype=datatype, shape=tuple(shape), values=values), offset


def _outputs(outputs_json: object) -> tuple[list[RequestedOutput], list[str]]:
    if not isinstance(outputs_json, list):
        raise MalformedRequest("\"outputs\" must be a list of {\"name\": ...}")
    outputs: list[RequestedOutput] = []
    binary: list[str] = []
    for i, output in enumerate(outputs_json):
        name = output.get("name") if isinstance(output, dict) else None
        if not isinstance(name, str):
            raise MalformedRequest(f"outputs[{i}] must be a JSON object with a \"name\" (a string)")
        parameters = _parameters(output.get("parameters"), f"output {shorten(name)!r}'s \"parameters\"")
        classification = parameters.get(CLASSIFICATION_PARAMETER, 0)
        if isinstance(classification, bool) or not isinstance(classification, int):
            raise MalformedRequest(f"output {shorten(name)!r}: {CLASSIFICATION_PARAMETER} must be an integer")
        if parameters.get(BINARY_DATA) is True:
            binary.append(name)
        outputs.append(RequestedOutput(name, classification))
    return outputs, binary


def _parameters(value: object, where: str) -> dict[str, ParameterValue]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedRequest(f"{where} must be a JSON object")
    for key, item in value.items():
        if not isinstance(item, bool | int | float | str):
            raise MalformedRequest(f"{where}: {shorten(key)!r} must be a boolean, number or string")
    return value


def _flat(data: object, where: str) -> Iterator[object]:
    """The elements of ``data`` (row-major, flat or nested lists) in order."""
    if not isinstance(data, list):
        raise MalformedRequest(f"{where}: \"data\" must be a list")
    stack: list[Iterator[object]] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > MAX_DIMS:
                    raise MalformedRequest(f"{where}: \"data\" is nested deeper than {MAX_DIMS} levels")
                stack.append(iter(item))
                break
            yield item
        else:
            stack.pop()


def header_length(headers: Mapping[str, str]) -> int | None:
    """The ``Inference-Header-Content-Length`` header as a number (None: absent)."""
    value = headers.get("inference-header-content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise MalformedRequest(f"Inference-Header-Content-Length is not a number: {shorten(value)!r}") from None
